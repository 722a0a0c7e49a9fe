#!/usr/bin/env python
"""MAE / CrossMAE pretraining (console script: crossmae-pretrain); flags follow MAE's main_pretrain.py.

    torchrun --nproc_per_node 8 tools/main_pretrain.py --config configs/pretrain/crossmae_vit_base_800ep.yaml --data_path /data/imagenet
"""
import sys

from pretrain.cli import pretrain

if __name__ == "__main__":
    sys.exit(pretrain())
