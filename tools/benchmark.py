#!/usr/bin/env python
"""MAE vs CrossMAE training cost, and the ViTDet backbone's attention kernels (crossmae-benchmark).

    .venv/bin/python tools/benchmark.py --size base --batch-size 8 --output output/bench
"""
import sys

from workflows.cli import benchmark

if __name__ == "__main__":
    sys.exit(benchmark())
