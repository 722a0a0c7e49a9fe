#!/usr/bin/env python
"""Train and evaluate a detectron2 LazyConfig, e.g. ViTDet Mask R-CNN (crossmae-train-net).

    .venv/bin/python tools/train_net.py --config-file configs/demo/mask_rcnn_vit_tiny_builtin.py
"""
import sys

from detection.cli import train_net

if __name__ == "__main__":
    sys.exit(train_net())
