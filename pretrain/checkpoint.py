"""Atomic, `weights_only`-loadable pretraining checkpoints.

A checkpoint is `{"model", "optimizer", "scaler", "epoch", "config"}`: state dicts, an int and a
plain dict, so `torch.load(path, weights_only=True)` reads it. The model keys are those of the
official MAE / CrossMAE code, so released checkpoints load into our models and ours into theirs.
"""
from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

LAST = "checkpoint-last.pth"


def save_atomic(obj: Any, path: str | Path) -> None:
    """`torch.save` to a temporary file in the same folder, then rename over `path`.

    A crash mid-write leaves the previous file intact, never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def make_checkpoint(model: torch.nn.Module, optimizer, scaler, epoch: int, config: dict) -> dict:
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,
        "config": dict(config),
    }


def read_checkpoint(path: str | Path, trust_pickle: bool = False) -> Any:
    """Load a weights file on CPU without running code from it: the project's one loader.

    `.safetensors` files are read with safetensors; anything else with `torch.load(weights_only=True)`, which
    refuses pickled objects other than tensors and plain containers. `trust_pickle=True` (the command
    lines' `--trust-pickle`) lifts that for files the user trusts, such as MAE's releases that store `args`.

    Raises:
        CheckpointError: the file is missing, empty, corrupt or truncated, or holds pickled objects (then the
            message names `--trust-pickle`; it never does for a corrupt file).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; check the path")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes), e.g. from an interrupted copy; "
                              "write or download it again")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read {path} as safetensors ({_first_line(e)}); is it complete?") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        if "weights only load failed" in str(e).lower():
            raise CheckpointError(f"{path} holds pickled Python objects besides tensors, and loading it would run "
                                  "code from the file; pass --trust-pickle only if you trust its source") from None
        raise CheckpointError(f"{path} is corrupt or not a torch checkpoint ({_first_line(e)}); "
                              "write or download it again") from None
    except Exception as e:  # noqa: BLE001 - zip, EOF and key errors of truncated or foreign files
        raise CheckpointError(f"{path} is corrupt, truncated or not a torch checkpoint ({_first_line(e)}); "
                              "write or download it again") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:120]}" if text else type(e).__name__


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint dict of this project (or any `{"model": ...}` file) through `read_checkpoint`.

    Raises:
        CheckpointError: unreadable file, or a file that holds something other than a dict.
    """
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict; give a checkpoint "
                              "written by this project or a {'model': state_dict} file")
    return ckpt


def load_model_weights(model: torch.nn.Module, state_dict: dict, strict: bool = True,
                       source: str = "checkpoint") -> None:
    """`load_state_dict` that reports the exact missing and unexpected keys, and wrong shapes, in one line.

    Raises:
        CheckpointError: with `strict`, any missing or unexpected key; always, a tensor of the wrong shape.
    """
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state_dict.items()
             if k in own and v.shape != own[k].shape]
    if wrong:
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: tensors of another shape "
                              f"({'; '.join(wrong[:4])}{'...' if len(wrong) > 4 else ''}); check --model and "
                              "--input_size match the checkpoint")
    result = model.load_state_dict(state_dict, strict=False)
    if strict and (result.missing_keys or result.unexpected_keys):
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: missing keys "
                              f"{result.missing_keys[:8]}{'...' if len(result.missing_keys) > 8 else ''}, unexpected "
                              f"keys {result.unexpected_keys[:8]}{'...' if len(result.unexpected_keys) > 8 else ''}; "
                              "check --model matches the checkpoint")


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """'' -> None; 'auto' -> OUTPUT_DIR/checkpoint-last.pth if it exists; else the given path."""
    if not resume:
        return None
    if resume == "auto":
        last = Path(output_dir) / LAST
        return last if last.is_file() else None
    return Path(resume)
