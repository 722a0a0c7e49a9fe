"""Shared by cls_drop.py and residual_share.py (experiment records, not project code): the demo's val images and
pretraining snapshots, from the command line both take."""
import argparse
from pathlib import Path

import torch

from pretrain.data.images import ImageFiles
from pretrain.weights.loading import load_encoder


def demo_encoders(description: str, snapshots: list[tuple[str, str]]):
    """Parse DEMO_OUTPUT [--seed N]; return the first 64 sorted pretraining images at 96 px (N, 3, 96, 96) and an
    iterator of (name, encoder) over `snapshots` ((name, path under seedN/pretrain/) pairs)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("demo_output", type=Path, metavar="DEMO_OUTPUT", help="the demo's output folder")
    p.add_argument("--seed", type=int, default=0, help="which seedN/ of the demo (default 0)")
    a = p.parse_args()
    torch.set_num_threads(2)
    root = a.demo_output / f"seed{a.seed}" / "pretrain"
    val = sorted((a.demo_output / "pretrain_images").iterdir())[:64]
    imgs = torch.stack([ImageFiles(val, 96)[i][0] for i in range(len(val))])
    return imgs, ((name, load_encoder(root / path)[0]) for name, path in snapshots)
