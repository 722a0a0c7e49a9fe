#!/usr/bin/env python
"""The whole path on one machine: pretrain, convert, detect, compare (make demo; crossmae-demo).

    .venv/bin/python tools/demo.py --seeds 0 1 2
"""
import sys

from workflows.cli import demo

if __name__ == "__main__":
    sys.exit(demo())
