"""Named model builders with their metadata: `build_model("crossmae_vit_base_patch16", mask_ratio=0.75)`.

`VIT_SIZES` is the one table of ViT sizes: the standard encoders, and the decoders of the released runs:
512 wide with 16 heads (256 / 8 for ViT-S, and 128 / 4 for ViT-Ti, which neither paper trained), 8 blocks
for MAE and 12 for CrossMAE. Every builder takes keyword overrides of any constructor argument, and each
registered name records its family ("mae" or "crossmae") and size, so no caller parses names.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch.nn as nn

from .crossmae import CrossMAE
from .mae import MAE

Builder = TypeVar("Builder", bound=Callable[..., nn.Module])

FAMILIES = ("mae", "crossmae")

VIT_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, decoder_embed_dim=128, decoder_num_heads=4),
    "small": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, decoder_embed_dim=256, decoder_num_heads=8),
    "base": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=512, decoder_num_heads=16),
    "large": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, decoder_embed_dim=512,
                  decoder_num_heads=16),
    "huge": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16, decoder_embed_dim=512, decoder_num_heads=16),
}


@dataclass(frozen=True)
class ModelInfo:
    """What a registered name stands for.

    Attributes:
        name: the registered name.
        family: "mae" or "crossmae".
        size: a key of `VIT_SIZES`.
        builder: the function building the model from keyword overrides.
    """

    name: str
    family: str
    size: str
    builder: Callable[..., nn.Module]

    @property
    def patch_size(self) -> int:
        return VIT_SIZES[self.size]["patch_size"]


_MODELS: dict[str, ModelInfo] = {}


def register_model(name: str, family: str, size: str) -> Callable[[Builder], Builder]:
    """Decorator registering a builder under `name`; a name already taken raises ValueError."""
    if family not in FAMILIES or size not in VIT_SIZES:
        raise ValueError(f"register_model({name!r}): family must be one of {FAMILIES} and size one of "
                         f"{tuple(VIT_SIZES)}, got {family!r}, {size!r}")

    def register(fn: Builder) -> Builder:
        if name in _MODELS:
            raise ValueError(f"model name {name!r} is already registered; pick another name")
        _MODELS[name] = ModelInfo(name, family, size, fn)
        return fn
    return register


def model_info(name: str) -> ModelInfo:
    """Metadata of a registered model; ValueError naming the known models otherwise."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return _MODELS[name]


def build_model(name: str, **overrides: Any) -> nn.Module:
    """Build the registered model `name`, with constructor arguments in `overrides` replaced."""
    return model_info(name).builder(**overrides)


def list_models(family: str | None = None, size: str | None = None) -> list[str]:
    """Registered model names, sorted; optionally only those of one family and/or size."""
    return sorted(n for n, i in _MODELS.items()
                  if (family is None or i.family == family) and (size is None or i.size == size))


def size_of_width(embed_dim: int) -> str | None:
    """The `VIT_SIZES` key whose encoder has this width, or None."""
    return next((s for s, spec in VIT_SIZES.items() if spec["embed_dim"] == embed_dim), None)


def _build(cls: type[nn.Module], size: str, overrides: dict[str, Any]) -> nn.Module:
    return cls(**{**VIT_SIZES[size], **overrides})


@register_model("mae_vit_tiny_patch16", "mae", "tiny")
def mae_vit_tiny_patch16(**overrides: Any) -> MAE:
    """MAE, ViT-Ti/16 encoder, 128-wide 8-block decoder."""
    return _build(MAE, "tiny", overrides)


@register_model("mae_vit_small_patch16", "mae", "small")
def mae_vit_small_patch16(**overrides: Any) -> MAE:
    """MAE, ViT-S/16 encoder, 256-wide 8-block decoder."""
    return _build(MAE, "small", overrides)


@register_model("mae_vit_base_patch16", "mae", "base")
def mae_vit_base_patch16(**overrides: Any) -> MAE:
    """MAE, ViT-B/16 encoder, 512-wide 8-block decoder."""
    return _build(MAE, "base", overrides)


@register_model("mae_vit_large_patch16", "mae", "large")
def mae_vit_large_patch16(**overrides: Any) -> MAE:
    """MAE, ViT-L/16 encoder, 512-wide 8-block decoder."""
    return _build(MAE, "large", overrides)


@register_model("mae_vit_huge_patch14", "mae", "huge")
def mae_vit_huge_patch14(**overrides: Any) -> MAE:
    """MAE, ViT-H/14 encoder, 512-wide 8-block decoder."""
    return _build(MAE, "huge", overrides)


@register_model("crossmae_vit_tiny_patch16", "crossmae", "tiny")
def crossmae_vit_tiny_patch16(**overrides: Any) -> CrossMAE:
    """CrossMAE, ViT-Ti/16 encoder, 128-wide 12-block decoder."""
    return _build(CrossMAE, "tiny", overrides)


@register_model("crossmae_vit_small_patch16", "crossmae", "small")
def crossmae_vit_small_patch16(**overrides: Any) -> CrossMAE:
    """CrossMAE, ViT-S/16 encoder, 256-wide 12-block decoder."""
    return _build(CrossMAE, "small", overrides)


@register_model("crossmae_vit_base_patch16", "crossmae", "base")
def crossmae_vit_base_patch16(**overrides: Any) -> CrossMAE:
    """CrossMAE, ViT-B/16 encoder, 512-wide 12-block decoder."""
    return _build(CrossMAE, "base", overrides)


@register_model("crossmae_vit_large_patch16", "crossmae", "large")
def crossmae_vit_large_patch16(**overrides: Any) -> CrossMAE:
    """CrossMAE, ViT-L/16 encoder, 512-wide 12-block decoder."""
    return _build(CrossMAE, "large", overrides)


@register_model("crossmae_vit_huge_patch14", "crossmae", "huge")
def crossmae_vit_huge_patch14(**overrides: Any) -> CrossMAE:
    """CrossMAE, ViT-H/14 encoder, 512-wide 12-block decoder."""
    return _build(CrossMAE, "huge", overrides)


def create_model(cfg: dict[str, Any]) -> nn.Module:
    """Build the registered model a pretraining config (`pretrain.training.config`) names, with its masking
    settings: `model`, `input_size`, `norm_pix_loss`, `mask_ratio`, `decoder_depth`, `model_kwargs`, and for
    CrossMAE `use_fm` and `prediction_ratio`."""
    overrides: dict[str, Any] = {**cfg.get("model_kwargs", {}), "img_size": cfg["input_size"],
                                 "norm_pix_loss": cfg["norm_pix_loss"], "mask_ratio": cfg["mask_ratio"]}
    if cfg["decoder_depth"] is not None:
        overrides["decoder_depth"] = cfg["decoder_depth"]
    crossmae = model_info(cfg["model"]).family == "crossmae"
    if crossmae and cfg.get("use_fm") is not None:
        overrides["use_fm"] = model_use_fm(cfg["use_fm"])
    model = build_model(cfg["model"], **overrides)
    if crossmae:
        model.prediction_ratio = cfg["prediction_ratio"]
    return model


def model_use_fm(use_fm: list[int]) -> list[int] | None:
    """The official `--use_fm` as `CrossMAE(use_fm=...)`: the official code reads a lone -1 as every block
    (`models_cross.py`), where the model's argument would read it as the last block; None means every block."""
    return None if list(use_fm) == [-1] else list(use_fm)
