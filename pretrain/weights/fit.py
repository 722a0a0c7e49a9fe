"""Fitting encoder weights into a target: what is the encoder, what shape is it, and how it is resampled and loaded.

- `ENCODER_KEY` / `encoder_state_dict` / `encoder_shape`: the ViT encoder of a state dict (timm / MAE / CrossMAE
  names) and its width, depth and patch, as pure functions (timm's `checkpoint_filter_fn` habit);
- `check_tensors`: every encoder tensor of the shape that encoder implies, and every weight finite; the import of
  every weights file (`pretrain.weights.formats.import_state_dict`) calls it, so no reader takes a broken tensor;
- `pos_embed_grid`: (cls slots, grid side) of a position embedding, the one place that reads a grid off a tensor;
- `resize_pos_embed` / `resize_patch_embed` / `fit_encoder`: a grid or patch size fitted to a target by timm's
  resampling (`resample_abs_pos_embed`, `resample_patch_embed`);
- `load_model_weights`: `load_state_dict` that names exact missing and unexpected keys and wrong shapes.

The pretraining trainer (`--init_from`), the encoder loader and the detectron2 converter all fit through here.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping

import torch
from timm.layers import resample_abs_pos_embed, resample_patch_embed

from ..errors import CheckpointError

__all__ = ["ENCODER_KEY", "encoder_state_dict", "encoder_shape", "check_tensors", "pos_embed_grid", "slots_grid",
           "resize_pos_embed", "resize_patch_embed", "fit_encoder", "load_model_weights"]

# timm's VisionTransformer names for the encoder (MAE's and CrossMAE's are the same)
ENCODER_KEY = re.compile(r"^(cls_token|pos_embed|patch_embed\..+|blocks\.\d+\..+|norm\.(weight|bias))$")


def encoder_state_dict(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Split a ViT state dict (timm / MAE / CrossMAE names) into its encoder and the rest.

    The encoder is `cls_token`, `pos_embed`, `patch_embed.*`, `blocks.{i}.*` and the final `norm.*` (MAE's;
    CrossMAE has none); everything else (decoder, `mask_token`, heads, `fc_norm`) is dropped.

    Returns:
        (encoder, dropped): the kept tensors under their own names, and the sorted names of the others.
    """
    kept = {k: v for k, v in state_dict.items() if ENCODER_KEY.match(k)}
    return kept, sorted(k for k in state_dict if k not in kept)


def encoder_shape(state_dict: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Embed dim, depth and patch size of the ViT encoder in `state_dict` (timm / MAE names).

    Raises:
        CheckpointError: no `patch_embed.proj.weight`, i.e. no ViT encoder, or blocks not numbered 0..n-1.
    """
    if "patch_embed.proj.weight" not in state_dict:
        raise CheckpointError("checkpoint has no 'patch_embed.proj.weight': not a ViT encoder with timm/MAE key "
                              "names")
    weight = state_dict["patch_embed.proj.weight"]  # (embed_dim, in_chans, patch, patch)
    if weight.dim() != 4 or weight.shape[-1] != weight.shape[-2]:
        raise CheckpointError(f"checkpoint tensor patch_embed.proj.weight has shape {tuple(weight.shape)}, expected "
                              "(embed_dim, channels, patch, patch); the file is corrupt or no ViT encoder")
    ids = {int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))}
    if ids != set(range(len(ids))):
        raise CheckpointError(f"checkpoint blocks are not numbered 0..n-1 (found {sorted(ids)}); it is not a "
                              "plain ViT")
    return {"embed_dim": weight.shape[0], "depth": len(ids), "patch_size": weight.shape[-1]}


# the shape of each encoder tensor of a ViT block (timm names), in its width D and MLP width H
_BLOCK_SHAPES = {
    "norm1.weight": ("D",), "norm1.bias": ("D",), "norm2.weight": ("D",), "norm2.bias": ("D",),
    "attn.qkv.weight": ("3D", "D"), "attn.qkv.bias": ("3D",), "attn.proj.weight": ("D", "D"), "attn.proj.bias": ("D",),
    "mlp.fc1.weight": ("H", "D"), "mlp.fc1.bias": ("H",), "mlp.fc2.weight": ("D", "H"), "mlp.fc2.bias": ("D",),
    "ls1.gamma": ("D",), "ls2.gamma": ("D",),
}
_TOP_SHAPES = {"cls_token": (1, 1, "D"), "pos_embed": (1, "N", "D"), "patch_embed.proj.bias": ("D",),
               "norm.weight": ("D",), "norm.bias": ("D",)}


def _expected_shape(key: str, dims: Mapping[str, int]) -> tuple[int | str, ...] | None:
    """The shape an encoder tensor must have, with "N" for a free size; None for a key without a fixed shape."""
    block = re.match(r"blocks\.\d+\.(.+)$", key)
    shape = _BLOCK_SHAPES.get(block.group(1)) if block else _TOP_SHAPES.get(key)
    return None if shape is None else tuple(dims.get(d, d) if isinstance(d, str) else d for d in shape)


def check_tensors(state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Refuse a state dict (our keys) with a non-finite weight, or an encoder tensor of another shape than the
    encoder `encoder_shape` infers (width from `patch_embed.proj.weight`, MLP width from the blocks' most common one).

    Raises:
        CheckpointError: naming the first such key, its shape and the shape it should have, in one line.
    """
    for key, value in state_dict.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise CheckpointError(f"{source}: {key} {tuple(value.shape)} holds {bad} NaN or infinite values; the "
                                  "weights are broken (e.g. saved by a diverged run): use an earlier checkpoint")
    if "patch_embed.proj.weight" not in state_dict:
        return
    try:
        dim = encoder_shape(state_dict)["embed_dim"]
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None
    hidden = Counter(v.shape[0] for k, v in state_dict.items() if re.fullmatch(r"blocks\.\d+\.mlp\.fc1\.weight", k)
                     and v.dim() == 2)
    dims = {"D": dim, "3D": 3 * dim, "H": hidden.most_common(1)[0][0] if hidden else "H"}
    for key, value in state_dict.items():
        want = _expected_shape(key, dims) if ENCODER_KEY.match(key) else None
        if want is not None and (value.dim() != len(want) or any(
                isinstance(w, int) and w != n for w, n in zip(want, value.shape))):
            shown = "(" + ", ".join(map(str, want)) + ("," if len(want) == 1 else "") + ")"
            raise CheckpointError(f"{source}: {key} has shape {tuple(value.shape)}, expected {shown} for the "
                                  f"{dim}-wide encoder its patch_embed.proj.weight implies; the file is corrupt or was "
                                  "edited: export or convert it again from the original checkpoint")


def slots_grid(slots: int) -> tuple[int, int]:
    """(cls slots, grid side) of a position embedding with `slots` positions: 1 + S*S (MAE's carry the cls slot)
    or S*S.

    Raises:
        CheckpointError: the count is neither S*S nor 1 + S*S.
    """
    for prefix in (1, 0):
        side = math.isqrt(slots - prefix)
        if side * side == slots - prefix and side > 0:
            return prefix, side
    raise CheckpointError(f"pos_embed has {slots} slots, neither S*S nor 1+S*S; cannot map it onto a square patch "
                          "grid")


def pos_embed_grid(pos_embed: torch.Tensor) -> tuple[int, int]:
    """(cls slots, grid side) of a (1, [1 +] S*S, D) position embedding (`slots_grid`).

    Raises:
        CheckpointError: the token count is neither S*S nor 1 + S*S.
    """
    return slots_grid(pos_embed.shape[1])


def resize_pos_embed(pos_embed: torch.Tensor, side: int) -> torch.Tensor:
    """(1, [1 +] S*S, D) -> (1, [1 +] side*side, D): the grid resampled bicubically (timm's resample_abs_pos_embed,
    antialiased when shrinking), the cls slot kept as it is."""
    prefix, old = pos_embed_grid(pos_embed)
    if old == side:
        return pos_embed
    return resample_abs_pos_embed(pos_embed.float(), [side, side], [old, old], num_prefix_tokens=prefix).to(
        pos_embed.dtype)


def resize_patch_embed(weight: torch.Tensor, patch: int) -> torch.Tensor:
    """(D, C, p, p) patch-embedding kernel -> (D, C, patch, patch) by timm's resample_patch_embed (FlexiViT's
    pseudo-inverse resize: the new kernel on a bicubically resized patch gives the old kernel's output)."""
    if weight.shape[-1] == patch:
        return weight
    return resample_patch_embed(weight.float(), [patch, patch]).to(weight.dtype)


def fit_encoder(sd: Mapping[str, torch.Tensor], *, patch_size: int | None = None,
                grid: int | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Resample an encoder (our keys) to a target's patch size and position grid: a pure function.

    Args:
        sd: state dict with `patch_embed.proj.weight` (D, C, p, p) and `pos_embed` (1, [1 +] S*S, D).
        patch_size: the target's patch side; None keeps the file's. Only a larger patch than the file's can be
            made (MAE's ViT-H/14 into ViTDet's patch-16 ViT-H): the resampled kernel then reproduces the old one's
            output on the resized patch, which does not hold the other way round.
        grid: the target's patch grid side (image size / patch size); None keeps the file's.

    Returns:
        (state dict, one note per resampled tensor).

    Raises:
        CheckpointError: the file's patch is larger than `patch_size`.
    """
    out, notes = dict(sd), []
    weight = out.get("patch_embed.proj.weight")
    if patch_size is not None and weight is not None and weight.shape[-1] != patch_size:
        if weight.shape[-1] > patch_size:
            raise CheckpointError(f"the checkpoint's patch {weight.shape[-1]} is larger than the target's "
                                  f"{patch_size}; only a smaller patch is resampled up (e.g. MAE's ViT-H/14 to 16): use a config "
                                  f"with patch_size={weight.shape[-1]}")
        out["patch_embed.proj.weight"] = resize_patch_embed(weight, patch_size)
        notes.append(f"patch_embed.proj.weight: patch {weight.shape[-1]} -> {patch_size} (timm resample_patch_embed)")
    pos_embed = out.get("pos_embed")
    if grid is not None and pos_embed is not None:
        side = pos_embed_grid(pos_embed)[1]
        if side != grid:
            out["pos_embed"] = resize_pos_embed(pos_embed, grid)
            notes.append(f"pos_embed: {side}x{side} -> {grid}x{grid} patch grid "
                         "(bicubic, timm resample_abs_pos_embed)")
    return out, notes


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
