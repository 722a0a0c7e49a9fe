"""Resume checkpoints of the trainer: `{"model", "optimizer", "scaler", "epoch", "config"}`.

State dicts, an int and a plain dict, so `torch.load(path, weights_only=True)` reads them; they are written with
`pretrain.files.save_atomic`. The model keys are those of the official MAE / CrossMAE code, so released
checkpoints load into our models and ours into theirs.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CheckpointError
from ..files import read_checkpoint

LAST = "checkpoint-last.pth"


def make_checkpoint(model: torch.nn.Module, optimizer, scaler, epoch: int, config: dict) -> dict:
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,
        "config": dict(config),
    }


def load_checkpoint(path: str | Path, trust_pickle: bool = False) -> dict:
    """A checkpoint dict of this project (or any `{"model": ...}` file) through `read_checkpoint` (`trust_pickle`:
    the user's `--trust-pickle`).

    Raises:
        CheckpointError: unreadable file, or a file that holds something other than a dict.
    """
    ckpt = read_checkpoint(path, trust_pickle=trust_pickle)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict; give a checkpoint "
                              "written by this project or a {'model': state_dict} file")
    return ckpt


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """'' -> None; 'auto' -> OUTPUT_DIR/checkpoint-last.pth if it exists; else the given path."""
    if not resume:
        return None
    if resume == "auto":
        last = Path(output_dir) / LAST
        return last if last.is_file() else None
    return Path(resume)
