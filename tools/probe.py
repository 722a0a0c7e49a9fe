#!/usr/bin/env python
"""Frozen-feature evaluation (k-NN and linear probe) of any checkpoint's encoder (crossmae-probe).

    .venv/bin/python tools/probe.py output/mae_tiny/checkpoint-last.pth --config-file configs/demo/mask_rcnn_vit_tiny_builtin.py
    torchrun --nproc_per_node 8 tools/probe.py mae_pretrain_vit_base.pth --data-path /data/imagenet --pool cls --optimizer lars
"""
import sys

from workflows.cli import probe

if __name__ == "__main__":
    sys.exit(probe())
