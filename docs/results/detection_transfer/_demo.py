"""Shared by the experiment records here (not project code): the demo's val images and pretraining snapshots
(cls_drop.py, residual_share.py), and the command line that edits a detectron2 init (identity_blocks.py,
rescale_stream.py)."""
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


def edit_checkpoint(description: str, value_arg: tuple[str, type, str], edit, note: str) -> None:
    """The command line of identity_blocks.py and rescale_stream.py: INPUT VALUE OUTPUT; `edit(key, tensor, value)`
    returns the new tensor or None to keep it; writes OUTPUT with `note.format(input=..., value=...)` as author."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", type=Path, help="detectron2 checkpoint (e.g. DEMO_OUTPUT/seed0/pretrain/d2_mae.pth)")
    name, kind, help_text = value_arg
    p.add_argument("value", type=kind, metavar=name, help=help_text)
    p.add_argument("output", type=Path, help="detectron2 checkpoint to write")
    a = p.parse_args()
    sd = dict(torch.load(a.input, weights_only=True)["model"])
    changed = 0
    for k in list(sd):
        new = edit(k, sd[k], a.value)
        if new is not None:
            sd[k], changed = new, changed + 1
    a.output.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": sd, "__author__": note.format(input=a.input.name, value=a.value)}, a.output)
    print(f"{a.output}: {changed} tensors changed")
