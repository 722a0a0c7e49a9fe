"""Hand a pretrained ViT encoder to detectron2's ViTDet: the one conversion route.

The input is any weights file `pretrain.weights.loading.read_weights` imports (official MAE / CrossMAE / timm,
transformers, mmpretrain, detectron2, this project's; or a released-weights name), already in timm/MAE names.
ViTDet's `ViT` has those names for `patch_embed.*`, `blocks.{i}.*` and `pos_embed` (kept at its pretraining size
with the cls slot, `pretrain_use_cls_token=True`), but neither a cls token nor a final `norm`; its `rel_pos_*`
tables are new and start at zero. So `to_vitdet` keeps the encoder that `pretrain.weights.fit.encoder_state_dict`
selects, minus `cls_token` and `norm`, under `backbone.net.`; resamples the position embedding when the target's
grid (`pretrain_img_size / patch_size`) differs, and the patch kernel when the target asks for a larger patch
(ViTDet's ViT-H uses patch 16; MAE's is 14); and refuses an encoder of another width or depth, since detectron2
would skip mismatched tensors with only a warning. `convert_checkpoint` is the file-to-file route that the
converter tool and the demo share; `detection.checkpointer.SafeCheckpointer` calls `to_vitdet` for a
`train.init_checkpoint` that is no detectron2 checkpoint.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from pretrain.errors import CheckpointError
from pretrain.files import check_output_file, save_atomic
from pretrain.weights.fit import encoder_shape, encoder_state_dict, fit_encoder, pos_embed_grid
from pretrain.weights.formats import LoadReport, grouped
from pretrain.weights.loading import read_weights
from pretrain.weights.releases import weights_file

__all__ = ["to_vitdet", "to_detectron2_checkpoint", "target_from_vit", "convert_checkpoint"]

_NOT_IN_VITDET = ("cls_token", "norm.weight", "norm.bias")  # ViTDet's ViT has no cls token and no final norm


def _with_cls_slot(pos_embed: torch.Tensor) -> torch.Tensor:
    """(1, [1 +] S * S, D) -> (1, 1 + S * S, D): ViTDet configs expect the cls slot (unused, dropped at forward)."""
    if pos_embed_grid(pos_embed)[0] == 1:
        return pos_embed
    return torch.cat([pos_embed.new_zeros(1, 1, pos_embed.shape[2]), pos_embed], dim=1)


def to_vitdet(sd: Mapping[str, torch.Tensor], *, embed_dim: int | None = None, depth: int | None = None,
              patch_size: int | None = None, pretrain_img_size: int | None = None, prefix: str = "backbone.net.",
              source: str = "checkpoint", layout: str = "official") -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Map a ViT state dict (timm / MAE / CrossMAE names) onto detectron2 ViTDet keys: a pure function.

    Args:
        sd: State dict with timm/MAE names (`cls_token`, `pos_embed` (1, [1 +] L, D), `patch_embed.proj.*`,
            `blocks.{i}.*`, decoder keys...), e.g. from `pretrain.weights.loading.read_weights`.
        embed_dim: Target config's embed dim; checked when given.
        depth: Target config's number of blocks; checked when given.
        patch_size: Target config's patch size; a smaller patch in `sd` is resampled up to it
            (`pretrain.weights.fit.fit_encoder`), a larger one refused.
        pretrain_img_size: Target config's `pretrain_img_size`. With the file's own patch size, its `pos_embed`
            grid must be `pretrain_img_size // patch_size` (else refused, naming the override that keeps the
            pretrained grid); when the patch is resampled, the grid is resampled with it.
        prefix: Prefix of the ViT inside the detectron2 model.
        source: The file, for the report.
        layout: The layout the file had, for the report.

    Returns:
        (new_sd, report): `{prefix + key: tensor}` for the kept keys, and a `LoadReport` whose `loaded` are the
        kept input keys and `dropped` the others, by group.

    Raises:
        CheckpointError: No ViT encoder, or one whose width, depth, patch or grid does not fit the target values.
    """
    found = encoder_shape(sd)
    wanted = {"embed_dim": embed_dim, "depth": depth, "patch_size": patch_size}
    wrong = {k: v for k, v in wanted.items() if v is not None and found[k] != v
             and not (k == "patch_size" and found[k] < v)}
    if wrong:
        raise CheckpointError(
            "checkpoint encoder (" + ", ".join(f"{k}={found[k]}" for k in wrong) + ") does not match the target "
            "config (" + ", ".join(f"{k}={v}" for k, v in wrong.items()) + "); use the config of the same ViT size")
    encoder, _ = encoder_state_dict(sd)
    used = sorted(k for k in encoder if k not in _NOT_IN_VITDET)
    kept = {k: sd[k] for k in used}
    if "pos_embed" in kept:
        kept["pos_embed"] = _with_cls_slot(kept["pos_embed"])
        grid = pos_embed_grid(kept["pos_embed"])[1]
        target_patch = patch_size or found["patch_size"]
        if (pretrain_img_size is not None and target_patch == found["patch_size"]
                and grid != pretrain_img_size // target_patch):
            # keep the pretrained grid (ViTDet resizes it once, at forward time) rather than resampling it here
            size = grid * found["patch_size"]
            raise CheckpointError(f"checkpoint pos_embed is a {grid}x{grid} grid but pretrain_img_size="
                                  f"{pretrain_img_size} with patch {found['patch_size']} wants "
                                  f"{pretrain_img_size // found['patch_size']}; set pretrain_img_size to {size} "
                                  f"(add model.backbone.net.pretrain_img_size={size} to the converter's and "
                                  "train_net's command lines)")
    # a smaller patch (MAE's ViT-H/14 into ViTDet's patch-16 ViT-H) is resampled up, and with it the grid
    grid = None if pretrain_img_size is None else pretrain_img_size // (patch_size or found["patch_size"])
    kept, resized = fit_encoder(kept, patch_size=patch_size, grid=grid)
    report = LoadReport(source, layout, loaded=used, dropped=grouped(k for k in sd if k not in kept), resized=resized)
    return {prefix + k: v for k, v in kept.items()}, report


def to_detectron2_checkpoint(new_sd: Mapping[str, torch.Tensor], source: str = "") -> dict[str, Any]:
    """Wrap converted weights as a native detectron2 .pth checkpoint (`DetectionCheckpointer` loads it by name).

    Tensors are made contiguous clones so the file does not carry the storage of dropped keys.
    """
    model = {k: v.detach().clone().contiguous() for k, v in new_sd.items()}
    return {"model": model, "__author__": f"convert_pretrain_to_d2 {source}".strip()}


def target_from_vit(vit_state_dict: Mapping[str, torch.Tensor]) -> dict[str, int | None]:
    """`TARGET_KEYS` of a built ViTDet `ViT` from its state dict (keys without `backbone.net.`)."""
    shape = encoder_shape(vit_state_dict)
    if "pos_embed" not in vit_state_dict:  # use_abs_pos=False
        return {**shape, "pretrain_img_size": None}
    side = pos_embed_grid(vit_state_dict["pos_embed"])[1]  # ViTDet keeps the cls slot
    return {**shape, "pretrain_img_size": side * shape["patch_size"]}


def convert_checkpoint(source: str | Path, output: str | Path, target: Mapping[str, int | None],
                       trust_pickle: bool = False, overwrite: bool = False) -> LoadReport:
    """Read a weights file (any layout `pretrain.weights.loading.read_weights` knows, or a release name), convert its
    encoder for `target`, write it atomically.

    Args:
        source: the input weights file or released-weights name.
        output: the detectron2 checkpoint to write; never left half-written.
        target: `TARGET_KEYS` values to check or fit (None: kept as the file has it), e.g. from `target_from_config`.
        trust_pickle: allow a pickle with Python objects in `source` (the user trusts it).
        overwrite: replace an existing `output` (never `source` itself, a folder or a device).

    Returns:
        The `LoadReport`: layout, kept and dropped input keys, resampled tensors.

    Raises:
        CheckpointError: unreadable source, no encoder, or an encoder that does not fit `target`.
        ConfigError: `output` cannot or may not be written (`pretrain.files.check_output_file`; before `source` is
            read).
    """
    check_output_file(output, (source, weights_file(source)), overwrite)
    weights = read_weights(source, trust_pickle=trust_pickle)
    new_sd, report = to_vitdet(weights.state_dict, **target, source=str(source), layout=weights.layout)
    save_atomic(to_detectron2_checkpoint(new_sd, source=Path(str(source)).name), output)
    return report
