"""Resume checkpoints of the trainer: `{"model", "optimizer", "scaler", "epoch", "config", "loss_window"}`, or with
`--fsdp` the same in a folder (`pretrain.sharded`, `training.sharding`).

State dicts, an int, a plain dict and a list of floats (the divergence guard's recent losses; older checkpoints
lack it), so `torch.load(path, weights_only=True)` reads them; they are written with `pretrain.files.save_atomic`.
The model keys are those of the official MAE / CrossMAE code, so released checkpoints load into our models and ours
into theirs.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..files import read_checkpoint
from ..sharded import SUFFIX, complete_folder, is_sharded, read_meta

LAST = "checkpoint-last.pth"
LAST_SHARDED = "checkpoint-last" + SUFFIX  # an --fsdp run's (`training.sharding`)
_NUMBERED = re.compile(r"checkpoint-(\d+)\.(pth|dcp)")


def make_checkpoint(model: torch.nn.Module, optimizer, scaler, epoch: int, config: dict,
                    loss_window: Sequence[float] = ()) -> dict:
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,
        "config": dict(config),
        "loss_window": [float(x) for x in loss_window],
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


def numbered_checkpoints(output_dir: str | Path) -> list[Path]:
    """The `checkpoint-<epoch>.pth` files and `.dcp` folders of a run's folder, oldest epoch first."""
    found = [(int(m[1]), p) for p in Path(output_dir).glob("checkpoint-*") if (m := _NUMBERED.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """'' -> None; 'auto' -> the checkpoint a run in OUTPUT_DIR left: `checkpoint-last.pth` or the complete folder
    `checkpoint-last.dcp` (of both, the later epoch's), else its newest numbered checkpoint, else None (a new run);
    any other value -> that path."""
    if not resume:
        return None
    if resume == "auto":
        out = Path(output_dir)
        lasts = [p for p in (out / LAST, complete_folder(out / LAST_SHARDED)) if p is not None and p.exists()]
        numbered = [p for p in numbered_checkpoints(output_dir) if p.is_file() or is_sharded(p)]
        epoch = {p: checkpoint_epoch(p) for p in lasts}  # -1: a stop inside epoch 0, before any epoch ended
        return (max(lasts, key=lambda p: -2 if epoch[p] is None else epoch[p]) if lasts
                else numbered[-1] if numbered else None)
    return Path(resume)


def checkpoint_epoch(path: str | Path) -> int | None:
    """The epoch a resume checkpoint of this trainer holds, read without loading its tensors (memory-mapped, so at
    once even for a large one, e.g. when a run stops; a folder's `meta.json`); None for a missing or unreadable one."""
    if Path(path).is_dir():
        epoch = read_meta(path).get("epoch")
        return epoch if isinstance(epoch, int) else None
    try:
        epoch = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("epoch")
    except Exception:  # noqa: BLE001 - missing, truncated or foreign: no epoch to report
        return None
    return epoch if isinstance(epoch, int) else None
