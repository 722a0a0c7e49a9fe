"""The fine-tuning classifier: timm's `VisionTransformer` as MAE's `models_vit` builds it, and a pretrained encoder
loaded into it.

Global pooling (MAE's default) averages the patch tokens (not the class token) and normalises them with `fc_norm`;
the pretrained final `norm` is then unused, as in MAE. With the class token (`--cls_token`) the final `norm` is
kept and the head reads token 0. Parameter names are timm's, so MAE's and CrossMAE's fine-tuned releases load as
they are.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer

from ..errors import CheckpointError
from ..models import VIT_SIZES
from ..weights.fit import encoder_state_dict, fit_encoder, load_model_weights, pos_embed_grid
from ..weights.formats import LoadReport, grouped
from ..weights.loading import read_weights
from .config import MODELS

__all__ = ["build_classifier", "load_pretrained"]

_HEAD = ("head.weight", "head.bias")
_FC_NORM = ("fc_norm.weight", "fc_norm.bias")


def build_classifier(model: str, num_classes: int, drop_path: float = 0.1, global_pool: bool = True,
                     input_size: int = 224, **sizes: int) -> VisionTransformer:
    """MAE's `models_vit.vit_*` classifier: timm's ViT with qkv bias, LayerNorm eps 1e-6, MLP ratio 4.

    Args:
        model: a key of `pretrain.finetune.config.MODELS`, e.g. "vit_base_patch16".
        num_classes: rows of the head.
        drop_path: stochastic depth rate of the last block (linear from 0 over the blocks, as timm).
        global_pool: average-pool the patch tokens into `fc_norm` (True) or read the class token after `norm`.
        input_size: image side; the position embedding has one slot per patch plus the class token's.
        sizes: overrides of the size table's embed_dim, depth, num_heads, patch_size (tiny test models).
    """
    spec = {**VIT_SIZES[MODELS[model]], **sizes}
    return VisionTransformer(img_size=input_size, patch_size=spec["patch_size"], embed_dim=spec["embed_dim"],
                             depth=spec["depth"], num_heads=spec["num_heads"], mlp_ratio=4.0, qkv_bias=True,
                             norm_layer=partial(nn.LayerNorm, eps=1e-6), num_classes=num_classes,
                             drop_path_rate=drop_path, global_pool="avg" if global_pool else "token")


def load_pretrained(model: VisionTransformer, source: str | Path, trust_pickle: bool = False) -> LoadReport:
    """Put the encoder of a weights file into `model` and re-initialise the head, as MAE's `--finetune` does.

    The file may be anything the converter reads (a pretraining checkpoint of this project or a released one, an
    exported encoder, a timm / transformers / mmpretrain file, a release name). The position embedding is resampled
    to the model's patch grid (e.g. for 448 px) and a smaller patch kernel to the model's patch. Left as initialised:
    the head (then drawn from N(0, 2e-5), MAE's `trunc_normal_`), `fc_norm` under global pooling, and the final
    `norm` of an encoder without one (CrossMAE's) under class-token pooling.

    Raises:
        CheckpointError: the file's encoder lacks other tensors of the model, or has them in other shapes.
    """
    weights = read_weights(source, trust_pickle)
    own = model.state_dict()
    given, _ = encoder_state_dict(weights.state_dict)
    given, resized = fit_encoder(given, patch_size=own["patch_embed.proj.weight"].shape[-1],
                                 grid=pos_embed_grid(own["pos_embed"])[1])
    taken = {k: v for k, v in given.items() if k in own}
    missing = sorted(set(own) - set(taken))
    optional = {*_HEAD, *_FC_NORM, "norm.weight", "norm.bias"}
    lacking = [k for k in missing if k not in optional]
    if lacking:
        raise CheckpointError(f"{source} lacks encoder tensors {lacking[:6]} of {len(model.blocks)}-block width-"
                              f"{model.embed_dim} ViT; give a checkpoint of the --model's size")
    load_model_weights(model, taken, strict=False, source=str(source))
    with torch.no_grad():
        trunc_normal_(model.head.weight, std=2e-5)  # MAE: "manually initialize fc layer"
    return LoadReport(str(source), weights.layout, loaded=sorted(taken),
                      dropped=grouped(k for k in weights.state_dict if k not in taken), missing=missing,
                      resized=resized)
