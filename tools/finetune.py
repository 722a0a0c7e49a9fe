#!/usr/bin/env python
"""End-to-end fine-tuning for classification with MAE's recipe (console script: crossmae-finetune); flags follow
MAE's main_finetune.py.

    torchrun --nproc_per_node 8 tools/finetune.py --config configs/finetune/vit_base.yaml \
        --finetune crossmae_vit_base --data_path /data/imagenet
    .venv/bin/python tools/finetune.py --eval --resume output/finetune/checkpoint-best.pth --data_path /data/imagenet
"""
import sys

from workflows.cli import finetune

if __name__ == "__main__":
    sys.exit(finetune())
