"""Optimizer parameter groups with ViTDet's layer-wise learning-rate decay, for detectron2 v0.6 and later.

detectron2 v0.6's `get_default_optimizer_params` has no `lr_factor_func`; `get_optimizer_params` is its
current-detectron2 form (same arguments, same grouping) so a LazyConfig can inject the decay rule:

    optimizer.params = L(get_optimizer_params)(
        base_lr="${..lr}", weight_decay_norm=0.0,
        lr_factor_func=partial(get_vit_lr_decay_rate, num_layers=12, lr_decay_rate=0.7),
        overrides={"pos_embed": {"weight_decay": 0.0}})

The trainer fills `params.model` before instantiating the optimizer.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch
import torch.nn as nn
from timm.layers import LayerNorm2d

from pretrain.training.layer_decay import layer_scale, vit_layer_id

__all__ = ["get_vit_lr_decay_rate", "get_optimizer_params"]

# detectron2's `norm_module_types`: their parameters get `weight_decay_norm`.
_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm, nn.InstanceNorm1d,
    nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm, nn.LocalResponseNorm,
)


def _is_norm(module: nn.Module) -> bool:
    """Whether detectron2 would give `module`'s parameters `weight_decay_norm`.

    ViTDet's channels-first LayerNorm (`detectron2.layers.LayerNorm`, the "LN" of the pyramid and the heads) is a
    plain `nn.Module`, so it is not in `norm_module_types` and its parameters get the ordinary weight decay (0.1
    in the COCO configs). timm's `LayerNorm2d`, which stands in for it here, subclasses `nn.LayerNorm`, so it is
    left out by name; the ViT blocks' own `nn.LayerNorm`s still count as norms.
    """
    return isinstance(module, _NORM_TYPES) and not isinstance(module, LayerNorm2d)


def get_vit_lr_decay_rate(name: str, lr_decay_rate: float = 1.0, num_layers: int = 12) -> float:
    """LR factor of one parameter under ViTDet's layer-wise decay (detectron2 `get_vit_lr_decay_rate`).

    Under `backbone`: `.pos_embed` / `.patch_embed` sit at layer 0, `.blocks.{i}.` (but not its conv
    `.residual.` branch) at layer i + 1; everything else (pyramid, heads, residual branches) at
    layer num_layers + 1. The factor is `lr_decay_rate ** (num_layers + 1 - layer)`: the rule of
    `pretrain.training.layer_decay`, which fine-tuning shares.

    Args:
        name: Full parameter name, e.g. "backbone.net.blocks.3.attn.qkv.weight".
        lr_decay_rate: Decay per block.
        num_layers: Number of ViT blocks.

    Returns:
        The multiplier for this parameter's learning rate.
    """
    layer = num_layers + 1
    if name.startswith("backbone") and ".residual." not in name:
        # the ViT's own parameter name starts at the first of these (".net.blocks.3...." -> "blocks.3....")
        starts = [name.find(m) for m in (".pos_embed", ".patch_embed", ".blocks.") if m in name]
        if starts:
            layer = vit_layer_id(name[min(starts) + 1:], num_layers)
    return layer_scale(layer, num_layers, lr_decay_rate)


def get_optimizer_params(model: nn.Module, base_lr: float | None = None, weight_decay: float | None = None,
                         weight_decay_norm: float | None = 0.0,
                         lr_factor_func: Callable[[str], float] | None = None,
                         overrides: dict[str, dict[str, float]] | None = None) -> list[dict[str, Any]]:
    """Parameter groups for a torch optimizer, merged so that each group has distinct hyperparameters.

    Semantics of current detectron2's `get_default_optimizer_params`: hyperparameters left unset here come
    from the optimizer's own arguments; parameters of norm layers (detectron2's `norm_module_types`, which do
    not include the channels-first LayerNorm: see `_is_norm`) get `weight_decay_norm`; `lr_factor_func`
    multiplies `base_lr` by a factor of the full parameter name ("module.param") and stores the product as
    the group's "lr", which detectron2's LR schedulers then scale; `overrides` maps a bare parameter name
    (e.g. "pos_embed", "rel_pos_h") to hyperparameters that win over everything else.

    Args:
        model: The module whose trainable parameters are grouped (filled in by the trainer in LazyConfigs).
        base_lr: LR of every group; required with `lr_factor_func` (in a LazyConfig: "${..lr}").
        weight_decay: Weight decay of every group; None leaves the optimizer's.
        weight_decay_norm: Weight decay of norm-layer parameters; None treats them like the rest.
        lr_factor_func: Maps a full parameter name to its LR factor, e.g. `get_vit_lr_decay_rate`.
        overrides: Per-parameter-name hyperparameters; None means `{"pos_embed": {"weight_decay": 0.0}}`
            (ViTDet's setting), `{}` means none.

    Returns:
        A list of `{"params": [...], "lr"?: float, "weight_decay"?: float}` dicts.
    """
    if lr_factor_func is not None and base_lr is None:
        # Without a base LR the factor cannot reach the group's "lr"; detectron2 refuses the same way.
        raise ValueError("lr_factor_func needs base_lr; set optimizer.params.base_lr = \"${..lr}\" in the config")
    overrides = {"pos_embed": {"weight_decay": 0.0}} if overrides is None else overrides
    defaults: dict[str, float] = {}
    if base_lr is not None:
        defaults["lr"] = base_lr
    if weight_decay is not None:
        defaults["weight_decay"] = weight_decay
    groups: dict[tuple[tuple[str, float], ...], list[torch.nn.Parameter]] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            hyper = copy.copy(defaults)
            if weight_decay_norm is not None and _is_norm(module):
                hyper["weight_decay"] = weight_decay_norm
            if lr_factor_func is not None:
                hyper["lr"] *= lr_factor_func(f"{module_name}.{param_name}")
            hyper.update(overrides.get(param_name, {}))
            groups.setdefault(tuple(sorted(hyper.items())), []).append(param)
    return [{"params": params, **dict(key)} for key, params in groups.items()]
