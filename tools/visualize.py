#!/usr/bin/env python
"""Reconstruction grids of any MAE / CrossMAE pretraining checkpoint (crossmae-visualize).

    .venv/bin/python tools/visualize.py output/pretrain/checkpoint-last.pth --builtin 16
"""
import sys

from pretrain.cli import visualize

if __name__ == "__main__":
    sys.exit(visualize())
