"""What a weights file holds, and how it becomes an encoder or a model: the one route every tool takes.

- `read_weights(path_or_name)`: a weights file, or a released-weights name (`pretrain.weights.releases`), read
  safely (`pretrain.files.read_checkpoint`) and imported into this project's keys from whatever layout it has
  (`pretrain.weights.formats`: official MAE / CrossMAE / timm, transformers, mmpretrain, detectron2).
- `state_dict_of(checkpoint)`: the same import for an already loaded checkpoint.
- `model_family(state_dict)`: "mae" or "crossmae" from the key names, or a one-line error naming what the
  file is instead.
- `infer_architecture` / `load_pretrain_model`: rebuild an MAE / CrossMAE model from its weights alone
  (released checkpoints) or from the config this project stores in its own; `load_encoder` also takes
  encoder-only files; `load_encoder_into` puts a file's encoder into a model being trained (`--init_from`);
  each returns a `pretrain.weights.formats.LoadReport` of what was loaded and dropped.
- `export_encoder`: a file's encoder alone, in the layout of MAE's released encoders.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn as nn

from ..errors import CheckpointError
from ..files import check_output_file, read_checkpoint, save_atomic
from ..models import VIT_SIZES, CrossMAE, build_model, create_model, list_models, model_info, size_of_width
from ..models.encoder import MaskedViTEncoder
from .fit import encoder_shape, encoder_state_dict, fit_encoder, load_model_weights, pos_embed_grid
from .formats import LoadReport, family_of, grouped, import_state_dict, is_detectron2
from .releases import release_of, resolve_weights, weights_file

__all__ = ["Weights", "read_weights", "state_dict_of", "model_family", "infer_architecture", "load_pretrain_model",
           "load_encoder", "load_encoder_into", "export_encoder"]

_DECODER_HEAD_DIM = 32  # every released MAE / CrossMAE decoder: 512 / 16, 256 / 8 (and ours 128 / 4)


class Weights(NamedTuple):
    """A weights file read and imported.

    Attributes:
        state_dict: its tensors in this project's keys.
        layout: the `pretrain.weights.formats.LAYOUTS` name it was written in.
        checkpoint: the loaded file as it is (for `epoch`, `config`, `meta`).
        path: the file read (the cached download, for a release name).
        source: what the user gave (path or name), for messages.
    """

    state_dict: dict[str, torch.Tensor]
    layout: str
    checkpoint: Any
    path: Path
    source: str


def read_weights(source: str | Path, trust_pickle: bool = False) -> Weights:
    """Read a weights file, or a released-weights name, into this project's keys.

    Raises:
        CheckpointError: an unknown name, a failed download, an unreadable or unsafe file (see `read_checkpoint`),
            or no tensors in it.
    """
    path = resolve_weights(source)
    checkpoint = read_checkpoint(path, trust_pickle=trust_pickle)
    state_dict, layout = import_state_dict(checkpoint, str(source))
    return Weights(state_dict, layout.name, checkpoint, path, str(source))


def state_dict_of(checkpoint: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The model state dict of a loaded checkpoint in this project's keys, whatever layout it was written in.

    Its "model" (or "state_dict") entry if present, else the mapping itself; non-tensor entries dropped,
    "module." / "_orig_mod." prefixes stripped; then `pretrain.weights.formats.import_state_dict`.

    Raises:
        CheckpointError: `checkpoint` is no mapping, or holds no tensors.
    """
    return import_state_dict(checkpoint, source)[0]


def _grid_with_cls_slot(pos_embed: torch.Tensor, source: str | Path) -> int:
    """The grid side of a (1, 1 + S*S, D) position embedding (this project's models carry the cls slot).

    Raises:
        CheckpointError: the slots are no square grid, or it has no cls slot.
    """
    prefix, grid = pos_embed_grid(pos_embed)
    if prefix != 1:
        raise CheckpointError(f"{source} has a pos_embed of {pos_embed.shape[1]} slots, not 1 + S*S (cls + a square "
                              "grid); this loader needs the cls slot")
    return grid


def _refuse_detectron2(weights: Weights, what: str) -> None:
    if weights.layout == "detectron2":
        raise CheckpointError(f"{weights.source} is a detectron2 (detection) checkpoint; {what}")


def _max_index(state_dict: Mapping[str, torch.Tensor], prefix: str) -> int:
    """1 + the largest i of keys `prefix{i}.`, or 0."""
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = [int(m.group(1)) for k in state_dict if (m := pat.match(k))]
    return max(found) + 1 if found else 0


def model_family(state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> str:
    """"mae" or "crossmae" from the key names of a pretraining state dict.

    Raises:
        CheckpointError: the file is a detectron2 checkpoint, has no ViT encoder, holds an encoder only,
            or has a decoder of neither kind; the message says which.
    """
    keys = list(state_dict)
    if is_detectron2(state_dict):
        raise CheckpointError(f"{source} is a detectron2 (detection) checkpoint; give a pretraining checkpoint "
                              "(output/pretrain/checkpoint-*.pth or a released MAE / CrossMAE one)")
    if not any(k.startswith("blocks.") for k in keys) or "patch_embed.proj.weight" not in state_dict:
        raise CheckpointError(f"{source} has no ViT encoder keys (patch_embed.proj, blocks.*); give an MAE or "
                              "CrossMAE pretraining checkpoint")
    family = family_of(state_dict)
    if family is not None:
        return family
    if not any(k.startswith(("decoder", "mask_token")) for k in keys):
        raise CheckpointError(f"{source} holds an encoder only (an export, a fine-tuned ViT, or MAE's "
                              "mae_pretrain_vit_*.pth); these tools need a pretraining checkpoint with its decoder "
                              "(e.g. MAE's mae_visualize_vit_large.pth)")
    raise CheckpointError(f"{source} has a decoder that is neither MAE's nor CrossMAE's (no decoder_embed, wfm or "
                          "cross_attn keys)")


def infer_architecture(state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint",
                       model_name: str | None = None) -> tuple[str, dict[str, Any]]:
    """Registered model name and constructor overrides that rebuild a model from its weights alone.

    Widths, depths, patch and image size, MLP ratio, CrossMAE's `use_input` and decoder
    self-attention are read from tensor shapes and key names. Head counts are not in the weights:
    the encoder's come from the registered model of that width (or `model_name`), the decoder's
    from the 32-wide heads of every released decoder.

    Args:
        state_dict: keys as the official MAE / CrossMAE code.
        source: name of the file, for messages.
        model_name: registered model to build instead of the one inferred from the width.

    Returns:
        (name, overrides) for `build_model`.

    Raises:
        CheckpointError: what cannot be told from the weights, and which flag or file would tell it.
    """
    family = model_family(state_dict, source)
    proj = state_dict["patch_embed.proj.weight"]  # (D, C, p, p)
    dim, in_chans, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    if "pos_embed" not in state_dict:
        raise CheckpointError(f"{source} has no pos_embed; cannot tell the image size")
    grid = _grid_with_cls_slot(state_dict["pos_embed"], source)
    depth = _max_index(state_dict, "blocks.")
    overrides: dict[str, Any] = dict(img_size=grid * patch, patch_size=patch, in_chans=in_chans, embed_dim=dim,
                                     depth=depth, mlp_ratio=state_dict["blocks.0.mlp.fc1.weight"].shape[0] / dim)
    decoder_dim = state_dict["mask_token"].shape[-1]
    overrides["decoder_embed_dim"] = decoder_dim
    overrides["decoder_depth"] = _max_index(state_dict, "decoder_blocks.")
    if decoder_dim % _DECODER_HEAD_DIM:
        raise CheckpointError(f"{source} has a {decoder_dim}-wide decoder, not a multiple of {_DECODER_HEAD_DIM}; "
                              "cannot tell its head count; use a checkpoint saved with its config")
    overrides["decoder_num_heads"] = decoder_dim // _DECODER_HEAD_DIM
    if family == "crossmae":
        overrides.update(_crossmae_decoder(state_dict, source, depth))

    if model_name is not None:
        try:
            given = model_info(model_name)
        except ValueError as e:
            raise CheckpointError(f"--model: {e}") from None
        if given.family != family:
            raise CheckpointError(f"--model {model_name} is not a {family} model but {source} is a {family} "
                                  f"checkpoint; pick one of {', '.join(list_models(family))}")
        return model_name, overrides
    size = size_of_width(dim)
    if size is None:
        raise CheckpointError(f"cannot tell the encoder size of {source} (width {dim} is no registered ViT size); "
                              "pass --model NAME with the matching head count")
    candidates = list_models(family, size)
    exact = [m for m in candidates if model_info(m).patch_size == patch]
    return (exact or candidates)[0], overrides


def _crossmae_decoder(state_dict: Mapping[str, torch.Tensor], source: str, depth: int) -> dict[str, bool]:
    """CrossMAE's `use_input` and `decoder_self_attn`, read from its feature-map weights and key names."""
    if "wfm.linear.weight" not in state_dict:
        raise CheckpointError(f"{source} is a CrossMAE run without feature weighting (no wfm.*); this "
                              "project's CrossMAE needs --weight_fm checkpoints")
    k = state_dict["wfm.linear.weight"].shape[1]
    if k not in (depth, depth + 1):
        raise CheckpointError(f"{source} weights {k} feature maps of a {depth}-block encoder; cannot tell which "
                              "blocks (use_fm); use a checkpoint saved with its config")
    return {"use_input": k == depth + 1,
            "decoder_self_attn": any(k.startswith("decoder_blocks.0.self_attn.") for k in state_dict)}


def load_pretrain_model(path: str | Path, model_name: str | None = None, mask_ratio: float | None = None,
                        prediction_ratio: float | None = None, norm_pix_loss: bool | None = None,
                        trust_pickle: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Any MAE / CrossMAE pretraining checkpoint (a file in any layout of `pretrain.weights.formats`, or a release name)
    as a model in eval mode, on CPU.

    Ours carry `config` and are rebuilt with `pretrain.models.create_model`; released ones
    (`{"model": state_dict}`, transformers, mmpretrain) through `infer_architecture`. Every tensor must fit.

    Args:
        path: checkpoint file or released-weights name.
        model_name: registered model, for checkpoints without config.
        mask_ratio: overrides the checkpoint's (default 0.75 where it has none).
        prediction_ratio: CrossMAE; default `mask_ratio`: reconstruct every masked patch (the
            queries are independent, so this changes no single prediction).
        norm_pix_loss: whether predictions are in per-patch normalised pixels; default the
            config's, else the release's (MAE's visualisation files: False), else True as in every released recipe.
        trust_pickle: allow pickled Python objects in the file (`--trust-pickle`; e.g. releases that store `args`).

    Returns:
        (model, info) where info has "name", "family", "source" ("config" or "inferred"),
        "mask_ratio", "prediction_ratio", "epoch" and "report" (a `LoadReport`).

    Raises:
        CheckpointError: in one line, what the file is if it is no usable pretraining checkpoint.
    """
    weights = read_weights(path, trust_pickle)
    _refuse_detectron2(weights, "give a pretraining checkpoint (output/pretrain/checkpoint-*.pth or a released MAE / "
                                "CrossMAE one)")
    release = release_of(path)
    if norm_pix_loss is None and release is not None:
        norm_pix_loss = release.norm_pix_loss
    return _pretrain_model(weights, model_name, mask_ratio, prediction_ratio, norm_pix_loss)


def _pretrain_model(weights: Weights, model_name: str | None, mask_ratio: float | None,
                    prediction_ratio: float | None, norm_pix_loss: bool | None) -> tuple[nn.Module, dict[str, Any]]:
    state_dict, ckpt, path = weights.state_dict, weights.checkpoint, weights.source
    family = model_family(state_dict, path)
    config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else None
    if config and config.get("model"):
        if model_name and model_name != config["model"]:
            raise CheckpointError(f"{path} was trained as {config['model']}, not --model {model_name}; drop --model")
        mask_ratio = config["mask_ratio"] if mask_ratio is None else mask_ratio
        cfg = {"model_kwargs": {}, "decoder_depth": None, **config, "mask_ratio": mask_ratio,
               "prediction_ratio": mask_ratio if prediction_ratio is None else prediction_ratio,
               "norm_pix_loss": config.get("norm_pix_loss", True) if norm_pix_loss is None else norm_pix_loss}
        name, source = config["model"], "config"
        try:
            model = create_model(cfg)
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"the config stored in {path} cannot build {config['model']} "
                                  f"({type(e).__name__}: {e})") from None
    else:
        name, overrides = infer_architecture(state_dict, path, model_name)
        mask_ratio = 0.75 if mask_ratio is None else mask_ratio
        overrides.update(mask_ratio=mask_ratio, norm_pix_loss=True if norm_pix_loss is None else norm_pix_loss)
        if family == "crossmae":
            overrides["prediction_ratio"] = mask_ratio if prediction_ratio is None else prediction_ratio
        source = "inferred"
        try:
            model = build_model(name, **overrides)
        except (ValueError, AssertionError, TypeError) as e:
            raise CheckpointError(f"cannot build {name} for {path} ({e}); pass --model NAME with a matching head "
                                  "count") from None
    load_model_weights(model, state_dict, source=path)
    try:
        if prediction_ratio is not None:
            model.prediction_ratio = prediction_ratio  # MAE refuses any value but mask_ratio
        model.num_visible()
        if isinstance(model, CrossMAE):
            model.num_predicted()
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    report = LoadReport(path, weights.layout, loaded=sorted(state_dict))
    info = {"name": name, "family": "crossmae" if isinstance(model, CrossMAE) else "mae", "source": source,
            "mask_ratio": model.mask_ratio, "prediction_ratio": model.prediction_ratio, "epoch": ckpt.get("epoch"),
            "report": report}
    return model.eval(), info


def export_encoder(checkpoint: str | Path, output: str | Path, trust_pickle: bool = False,
                   overwrite: bool = False) -> tuple[int, int]:
    """Write the encoder of a weights file (any layout, or a release name) as `{"model": encoder_state_dict,
    "meta": {...}}`, the layout of MAE's released `mae_pretrain_vit_*.pth` (timm names, so timm and the detectron2
    converter read it).

    Args:
        checkpoint: the weights file or released-weights name to read.
        output: the file to write, atomically; see `pretrain.files.check_output_file` for what is refused.
        trust_pickle: allow a pickle with Python objects in `checkpoint` (the user trusts it).
        overwrite: replace an existing `output` (never `checkpoint` itself, a folder or a device).

    Returns:
        (tensors written, keys dropped).

    Raises:
        CheckpointError: the file holds no ViT encoder.
        ConfigError: `output` cannot or may not be written (before `checkpoint` is read).
    """
    check_output_file(output, (checkpoint, weights_file(checkpoint)), overwrite)
    weights = read_weights(checkpoint, trust_pickle)
    _refuse_detectron2(weights, "give a pretraining checkpoint")
    ckpt = weights.checkpoint if isinstance(weights.checkpoint, dict) else {}
    encoder, dropped = encoder_state_dict(weights.state_dict)
    if not any(k.startswith("blocks.") for k in encoder):
        raise CheckpointError(f"{checkpoint} has no encoder keys (blocks.*); is it a pretraining checkpoint?")
    meta = {"source": str(checkpoint), "epoch": ckpt.get("epoch"), "config": ckpt.get("config", {})}
    save_atomic({"model": encoder, "meta": meta}, output)
    return len(encoder), len(dropped)


def load_encoder(path: str | Path, model_name: str | None = None,
                 trust_pickle: bool = False) -> tuple[MaskedViTEncoder, dict[str, Any]]:
    """The ViT encoder of any weights file the project reads, in eval mode on CPU: a pretraining checkpoint
    (ours or released, the whole model, whose `forward_features` is the encoder's) or an encoder-only file
    (`tools/export_encoder.py` output, MAE's `mae_pretrain_vit_*.pth`, a timm or transformers ViT, a fine-tuned
    CrossMAE), in any layout of `pretrain.weights.formats`, or a release name.

    Returns:
        (encoder, info) where info has "name" (registered model or "encoder"), "family" (None for encoder-only
        files), "epoch", "kept" (encoder tensors loaded) and "report" (a `LoadReport`).

    Raises:
        CheckpointError: no ViT encoder in the file (e.g. a detectron2 checkpoint), or one of unknown width.
    """
    weights = read_weights(path, trust_pickle)
    _refuse_detectron2(weights, "give a pretraining or encoder checkpoint")
    sd, ckpt = weights.state_dict, weights.checkpoint
    family = family_of(sd)
    if family is not None:
        release = release_of(path)
        model, info = _pretrain_model(weights, model_name, None, None, release.norm_pix_loss if release else None)
        return model, {"name": info["name"], "family": family, "epoch": info["epoch"],
                       "kept": len(encoder_state_dict(model.state_dict())[0]), "report": info["report"]}
    encoder, _ = encoder_state_dict(sd)
    shape = encoder_shape(encoder)
    if "pos_embed" not in encoder:
        raise CheckpointError(f"{path} has no pos_embed; cannot tell the encoder's input size")
    grid = _grid_with_cls_slot(encoder["pos_embed"], path)
    ckpt = ckpt if isinstance(ckpt, dict) else {}
    meta = ckpt.get("meta") if isinstance(ckpt.get("meta"), dict) else {}
    config = ckpt.get("config") or meta.get("config")  # ours; exports keep it under meta
    if model_name is not None:
        num_heads = VIT_SIZES[model_info(model_name).size]["num_heads"]
    elif isinstance(config, dict) and config.get("model"):
        num_heads = (config.get("model_kwargs") or {}).get("num_heads",
                                                           VIT_SIZES[model_info(config["model"]).size]["num_heads"])
    else:
        size = size_of_width(shape["embed_dim"])
        if size is None:
            raise CheckpointError(f"cannot tell the head count of {path} (width {shape['embed_dim']} is no registered "
                                  "ViT size); pass --model NAME")
        num_heads = VIT_SIZES[size]["num_heads"]
    with torch.random.fork_rng():  # the weights are overwritten below; leave the caller's random state alone
        model = MaskedViTEncoder(img_size=grid * shape["patch_size"], patch_size=shape["patch_size"],
                                 in_chans=encoder["patch_embed.proj.weight"].shape[1], embed_dim=shape["embed_dim"],
                                 depth=shape["depth"], num_heads=num_heads,
                                 mlp_ratio=encoder["blocks.0.mlp.fc1.weight"].shape[0] / shape["embed_dim"],
                                 final_norm="norm.weight" in encoder)
    load_model_weights(model, encoder, source=str(path))
    report = LoadReport(str(path), weights.layout, loaded=sorted(encoder),
                        dropped=grouped(k for k in sd if k not in encoder))
    epoch = ckpt.get("epoch", meta.get("epoch"))
    return model.eval(), {"name": "encoder", "family": None, "epoch": epoch, "kept": len(encoder), "report": report}


def load_encoder_into(model: nn.Module, path: str | Path, trust_pickle: bool = False) -> LoadReport:
    """Replace the fresh encoder of `model` with the encoder tensors of a weights file (any layout of
    `pretrain.weights.formats`, or a released-weights name) at `path`.

    Only encoder keys are taken (`encoder_state_dict`); every encoder tensor of `model` must be in the file with the
    same shape, except that the position embedding is resampled to the model's patch grid and a smaller patch
    kernel to the model's patch (`fit_encoder`). Used so that two methods start from the very same encoder, or a
    run from released weights. `trust_pickle`: the user's `--trust-pickle`.

    Returns:
        The `LoadReport` (its `loaded` are the replaced tensors).

    Raises:
        CheckpointError: the file lacks some of the model's encoder tensors, or has them in other shapes.
    """
    own = model.state_dict()
    wanted, _ = encoder_state_dict(own)
    weights = read_weights(path, trust_pickle)
    given, _ = encoder_state_dict(weights.state_dict)
    given, resized = fit_encoder(given, patch_size=own["patch_embed.proj.weight"].shape[-1],
                                 grid=pos_embed_grid(own["pos_embed"])[1])
    missing = sorted(set(wanted) - set(given))
    if missing:
        raise CheckpointError(f"--init_from {path} lacks encoder tensors {missing[:6]}; give a checkpoint of the same "
                              "encoder")
    load_model_weights(model, {k: given[k] for k in wanted}, strict=False, source=str(path))
    return LoadReport(str(path), weights.layout, loaded=sorted(wanted),
                      dropped=grouped(k for k in weights.state_dict if k not in wanted), resized=resized)
