#!/usr/bin/env python
"""Compare detection AP of several train_net runs side by side (crossmae-compare).

    .venv/bin/python tools/compare_backbones.py output/det_mae output/det_crossmae --names MAE CrossMAE --plot ap.png
"""
import sys

from detection.cli import compare_backbones

if __name__ == "__main__":
    sys.exit(compare_backbones())
