#!/usr/bin/env python
"""Convert an MAE / CrossMAE / timm ViT checkpoint into a detectron2 ViTDet checkpoint (crossmae-convert).

    .venv/bin/python tools/convert_pretrain_to_d2.py IN.pth OUT.pth --config configs/COCO/mask_rcnn_vitdet_b_100ep.py
"""
import sys

from detection.cli import convert

if __name__ == "__main__":
    sys.exit(convert())
