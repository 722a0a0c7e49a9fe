"""The pretraining optimizer: AdamW over MAE's parameter groups."""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.optim import param_groups_weight_decay


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight-decay groups as the official MAE and CrossMAE trainers build them (timm's `add_weight_decay`
    without a skip list): no decay on biases and 1-D parameters (norms), decay on everything else,
    `cls_token`, `mask_token` and CrossMAE's `wfm.linear.weight` included; frozen parameters
    (the sin-cos position embeddings) are left out."""
    return param_groups_weight_decay(model, weight_decay=weight_decay, weight_decay_exclude_1d=True)


def fused_by_default(device: torch.device) -> bool:
    """Whether the trainer and the benchmark use torch's fused AdamW on `device`: on CUDA and CPU, where it is one
    kernel for all parameters (the same update as torch's default implementation,
    `tests/pretrain/training/test_optim.py`)."""
    return device.type in ("cuda", "cpu")


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, fused: bool = False) -> torch.optim.AdamW:
    """AdamW with betas (0.9, 0.95), as MAE; `fused` runs the kernel that updates all parameters at once."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.95), fused=fused)
