"""The learning-rate schedule of every trainer here: linear warm-up, then half-cycle cosine (MAE's `lr_sched.py`).

Pretraining steps it per iteration in fractional epochs (`lr_at`), fine-tuning too (`pretrain.finetune.engine`,
with each layer's `lr_scale` through `set_lr`); the linear probe per optimizer step
(`pretrain.evaluation.probe.linear_probe`). One function, `warmup_cosine`, serves all three.
"""
from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["warmup_cosine", "lr_at", "set_lr"]


def warmup_cosine(progress: float, warmup: float, total: float, peak: float, floor: float = 0.0) -> float:
    """Linear warm-up from 0 to `peak` over `warmup`, then half-cycle cosine down to `floor` at `total`.

    Args:
        progress: how far the run is, in the unit of `warmup` and `total` (epochs, fractional, or steps).
        warmup: length of the warm-up (0: none).
        total: length of the whole run.
        peak: the value at the end of the warm-up.
        floor: the value at `total`.
    """
    if progress < warmup:
        return peak * progress / warmup
    done = (progress - warmup) / max(total - warmup, 1e-8)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * done))


def lr_at(epoch_float: float, cfg: dict[str, Any], peak_lr: float) -> float:
    """The pretraining lr: `warmup_cosine` over the config's `warmup_epochs` and `epochs`, down to `min_lr`.

    Args:
        epoch_float: epochs done so far, fractional (epoch + iteration / iterations_per_epoch).
    """
    return warmup_cosine(epoch_float, cfg["warmup_epochs"], cfg["epochs"], peak_lr, cfg["min_lr"])


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's lr to `lr` times its `lr_scale` (1 if none)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
