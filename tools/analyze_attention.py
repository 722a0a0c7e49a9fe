#!/usr/bin/env python
"""Decoder attention analysis of an MAE or CrossMAE checkpoint (crossmae-analyze-attention).

    .venv/bin/python tools/analyze_attention.py output/mae_b/checkpoint-last.pth /data/imagenet/val --batch_size 64
"""
import sys

from pretrain.cli import analyze_attention

if __name__ == "__main__":
    sys.exit(analyze_attention())
