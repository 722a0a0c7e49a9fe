"""ViTDet's learning-rate schedule: linear warm-up, then x0.1 at 8/9 and x0.01 at 26/27 of the run.

One definition for the COCO configs, the demo configs and the demo's shortened runs:

    lr_multiplier = vitdet_lr_multiplier(max_iter=184375, warmup_iters=250)
"""
from __future__ import annotations

from fvcore.common.param_scheduler import MultiStepParamScheduler

from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler

from pretrain.errors import ConfigError

__all__ = ["STEP_FRACTIONS", "vitdet_milestones", "vitdet_lr_multiplier"]

STEP_FRACTIONS = (8 / 9, 26 / 27)  # ViTDet: 100 ep with drops at 88.9 and 96.3 ep


def vitdet_milestones(max_iter: int) -> list[int]:
    """Iterations of the two drops in a run of `max_iter` iterations: round(max_iter * 8/9), round(max_iter * 26/27).

    Raises:
        ConfigError: the run is too short for two distinct drops before its end.
    """
    milestones = sorted({min(round(max_iter * f), max_iter - 1) for f in STEP_FRACTIONS})
    if len(milestones) < 2:
        raise ConfigError(f"{max_iter} iterations are too short for ViTDet's two learning-rate steps; use at "
                          "least 14")
    return milestones


def vitdet_lr_multiplier(max_iter: int, warmup_iters: float, warmup_factor: float = 0.001):
    """A LazyCall `WarmupParamScheduler` over `MultiStepParamScheduler` with ViTDet's steps for `max_iter`.

    detectron2 evaluates it at `iteration / max_iter`, so the warm-up is given as a fraction of the run.
    """
    return L(WarmupParamScheduler)(
        scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1, 0.01], milestones=vitdet_milestones(max_iter),
                                             num_updates=max_iter),
        warmup_length=warmup_iters / max_iter,
        warmup_factor=warmup_factor,
    )
