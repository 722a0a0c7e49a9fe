"""Layer-wise learning-rate decay for ViTs: the one rule that fine-tuning and ViTDet's detection training share.

A ViT of `depth` blocks has `depth + 2` layers: the embeddings (`cls_token`, `pos_embed`, `patch_embed`) are layer
0, block i is layer i + 1, and everything after the blocks (the final norm, the head; in ViTDet the pyramid and the
detection heads) is layer `depth + 1`. A parameter of layer l trains at `decay ** (depth + 1 - l)` times the lr: the
head at the full lr, each block below it `decay` times slower (BEiT, then MAE's `util/lr_decay.py` and detectron2's
`get_vit_lr_decay_rate`).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch.nn as nn

__all__ = ["vit_layer_id", "layer_scale", "param_groups_lrd"]


def vit_layer_id(name: str, depth: int) -> int:
    """The layer of a ViT parameter named as timm names it (`blocks.3.attn.qkv.weight`), in 0 .. depth + 1."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def layer_scale(layer: int, depth: int, decay: float) -> float:
    """The lr multiplier of `layer` under a decay of `decay` per layer: `decay ** (depth + 1 - layer)`."""
    return decay ** (depth + 1 - layer)


def param_groups_lrd(model: nn.Module, weight_decay: float, no_weight_decay_list: Iterable[str] = (),
                     layer_decay: float = 0.75) -> list[dict]:
    """Optimizer groups of a timm ViT with layer-wise lr decay, as MAE's `param_groups_lrd` builds them.

    One group per (layer, decay or not), in order of first appearance among `model.named_parameters()`. 1-D
    parameters (biases, norms) and names in `no_weight_decay_list` get no weight decay. Each group carries its
    `lr_scale`, which `pretrain.training.schedule.set_lr` multiplies into the scheduled lr; frozen parameters are
    left out.

    Args:
        model: a ViT with `blocks` (timm's `VisionTransformer`).
        weight_decay: the decay of the other parameters.
        no_weight_decay_list: exact parameter names without decay (timm's `model.no_weight_decay()`).
        layer_decay: the lr factor per layer, in (0, 1].

    Returns:
        [{"lr_scale": float, "weight_decay": float, "params": [...]}, ...]
    """
    depth = len(model.blocks)
    skip = set(no_weight_decay_list)
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not (param.ndim == 1 or name in skip)
        layer = vit_layer_id(name, depth)
        group = groups.setdefault((layer, decay), {"lr_scale": layer_scale(layer, depth, layer_decay),
                                                   "weight_decay": weight_decay if decay else 0.0, "params": []})
        group["params"].append(param)
    return list(groups.values())
