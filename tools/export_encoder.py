#!/usr/bin/env python
"""Write the encoder of a pretraining checkpoint as a timm-named state dict (crossmae-export-encoder).

    .venv/bin/python tools/export_encoder.py output/pretrain/checkpoint-last.pth encoder.pth
"""
import sys

from pretrain.cli import export_encoder

if __name__ == "__main__":
    sys.exit(export_encoder())
