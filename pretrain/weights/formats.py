"""Every MAE-family weights layout, in this project's keys: one pure state-dict function per layout.

This project's keys are those of the official MAE and CrossMAE code, which are timm's for the encoder
(`cls_token`, `pos_embed`, `patch_embed.proj`, `blocks.{i}.norm1/attn.qkv/attn.proj/norm2/mlp.fc1/mlp.fc2`,
`norm`) plus each decoder's own names. A layout is recognised by its keys, never by the file name:

- `official` (the fallback: `patch_embed.proj.weight`, `blocks.{i}.`): MAE's `mae_pretrain_vit_*.pth`
  (encoder), `*_full.pth` and `mae_visualize_vit_*.pth` (with decoder); CrossMAE's `*-pretrain-wfm-*.pth` (with
  decoder) and `*-finetune-*.pth`; timm's `vit_*.mae` (`.safetensors` / `.pth`); this project's checkpoints and
  encoder exports. Already in our keys.
- `transformers` (`[vit.]embeddings.patch_embeddings.projection.weight`): Hugging Face `ViTMAEModel` /
  `ViTMAEForPreTraining` (`facebook/vit-mae-*`) as `model.safetensors` / `pytorch_model.bin`, in transformers 4
  (hub) and 5 names.
- `mmpretrain` (`backbone.layers.{i}.`, `backbone.patch_embed.projection.`): mmpretrain / mmselfsup MAE
  (`MAEViT` backbone, `MAEPretrainDecoder` neck).
- `detectron2` (`backbone.net.`, `roi_heads.`, `proposal_generator.`): ViTDet checkpoints, this project's
  converter output and `train_net` runs.

Keys a converter does not know pass through under their own names, so a strict load names them exactly.
`group_of` tells what a key that a target does not take is (decoder, mask_token, norm, head, ...), for the
report every load prints. Fitting an encoder to a target's grid or patch size is `pretrain.weights.fit`.
"""
from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import CheckpointError
from .fit import ENCODER_KEY, check_tensors

__all__ = ["LAYOUTS", "Layout", "LoadReport", "checkpoint_tensors", "detect_layout", "family_of",
           "from_detectron2", "from_mmpretrain", "from_official", "from_transformers", "group_of", "grouped",
           "import_state_dict", "is_detectron2", "summarize"]

_WRAPPERS = ("module.", "_orig_mod.")  # DistributedDataParallel and torch.compile prefixes
_CONTAINERS = ("model", "state_dict")  # MAE / CrossMAE / detectron2 / this project; mmengine (mmpretrain)


def checkpoint_tensors(checkpoint: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The state dict a loaded file holds: its "model" (or mmengine's "state_dict") entry, else the mapping itself.

    Non-tensor entries are dropped, and "module." / "_orig_mod." prefixes shared by all keys stripped.

    Raises:
        CheckpointError: `checkpoint` is no mapping, or holds no tensors.
    """
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{source} holds a {type(checkpoint).__name__}, not a checkpoint dict; give a "
                              "state dict or a {'model': state_dict} checkpoint")
    sd = next((checkpoint[k] for k in _CONTAINERS if isinstance(checkpoint.get(k), Mapping)), checkpoint)
    sd = {k: v for k, v in sd.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not sd:
        raise CheckpointError(f"{source} has no state dict of tensors (under 'model', 'state_dict' or at top level); "
                              "is it a model checkpoint?")
    for prefix in _WRAPPERS:
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _renamed(key: str, rules: Iterable[tuple[str, str]]) -> str | None:
    """The first rule's substitution of `key` whose pattern matches it, or None."""
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return None


# ------------------------------------------------------------------------------------------ official (identity)

def from_official(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MAE, CrossMAE, timm and this project's files already carry this project's keys."""
    return dict(sd)


# ------------------------------------------------------------------------------------------------- transformers

_HF_PATCH = "embeddings.patch_embeddings.projection.weight"
# inside one layer: transformers 4 / hub names first, then the names transformers 5 builds its modules with
_HF_LAYER = (
    (r"^layernorm_before\.", "norm1."),
    (r"^layernorm_after\.", "norm2."),
    (r"^attention\.(?:attention\.(query|key|value)|(q|k|v)_proj)\.(weight|bias)$", r"qkv:\1\2:\3"),
    (r"^attention\.(?:output\.dense|o_proj)\.", "attn.proj."),
    (r"^(?:intermediate\.dense|mlp\.fc1)\.", "mlp.fc1."),
    (r"^(?:output\.dense|mlp\.fc2)\.", "mlp.fc2."),
)


def from_transformers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face transformers `ViTMAEModel` / `ViTMAEForPreTraining` keys -> this project's.

    `[vit.]embeddings.{cls_token, position_embeddings, patch_embeddings.projection}` -> `cls_token`, `pos_embed`,
    `patch_embed.proj`; `[vit.]encoder.layer.{i}` (5.x modules: `layers.{i}`) -> `blocks.{i}` with `layernorm_before /
    after` -> `norm1 / norm2`, separate query, key, value (5.x: `q_proj`, ...) concatenated into `attn.qkv` in that
    order (timm's), `attention.output.dense` -> `attn.proj`, `intermediate.dense` / `output.dense` -> `mlp.fc1 / fc2`;
    `[vit.]layernorm` -> `norm`. ViTMAEForPreTraining's `decoder.decoder_layers.{i}` (as transformers 5 writes it:
    `decoder.decoder_encoder.layer.{i}`) -> `decoder_blocks.{i}`, and `decoder.{decoder_embed, mask_token,
    decoder_pos_embed, decoder_norm, decoder_pred}` lose their `decoder.` prefix; `classifier` -> `head`.

    Raises:
        CheckpointError: a layer has only some of its query, key and value tensors.
    """
    prefix = next(k[:-len(_HF_PATCH)] for k in sd if k.endswith(_HF_PATCH))
    p = re.escape(prefix)
    top = (
        (rf"^{p}embeddings\.cls_token$", "cls_token"),
        (rf"^{p}embeddings\.position_embeddings$", "pos_embed"),
        (rf"^{p}embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
        (rf"^{p}layernorm\.", "norm."),
        (r"^decoder\.(decoder_embed|decoder_norm|decoder_pred)\.", r"\1."),
        (r"^decoder\.(mask_token|decoder_pos_embed)$", r"\1"),
        (r"^classifier\.", "head."),
    )
    blocks = ((rf"^{p}(?:encoder\.layer|layers)\.(\d+)\.(.+)$", "blocks"),
              (r"^decoder\.(?:decoder_layers|decoder_encoder\.layer)\.(\d+)\.(.+)$", "decoder_blocks"))
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, value in sd.items():
        name = _renamed(key, top)
        for pattern, where in blocks:
            if name is None and (m := re.match(pattern, key)):
                inner = _renamed(m.group(2), _HF_LAYER)
                name = None if inner is None else f"{where}.{m.group(1)}.{inner}"
        if name is None:
            out[key] = value
        elif name.split(".")[-1].startswith("qkv:"):  # blocks.3.qkv:q:weight
            *at, part = name.split(".")
            _, which, kind = part.split(":")
            qkv[".".join(at) + f".attn.qkv.{kind}"][which[0]] = value
        else:
            out[name] = value
    for name, parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"transformers weights give {'/'.join(sorted(parts))} but not all of query, key "
                                  f"and value for {name}; the file is incomplete")
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


# --------------------------------------------------------------------------------------------------- mmpretrain

_MM_LAYER = (
    (r"^ln1\.", "norm1."),
    (r"^ln2\.", "norm2."),
    (r"^attn\.qkv\.", "attn.qkv."),
    (r"^attn\.proj\.", "attn.proj."),
    (r"^attn\.attn\.in_proj_(weight|bias)$", r"attn.qkv.\1"),  # mmcv's nn.MultiheadAttention wrapper: q, k, v too
    (r"^attn\.attn\.out_proj\.", "attn.proj."),
    (r"^ffn\.layers\.0\.0\.", "mlp.fc1."),  # mmcv FFN: Sequential(Sequential(Linear, act, drop), Linear, drop)
    (r"^ffn\.layers\.1\.", "mlp.fc2."),
    (r"^attn\.gamma1\.weight$", "ls1.gamma"),  # layer scale (not in MAE): timm's names, so a load names them
    (r"^ffn\.gamma2\.weight$", "ls2.gamma"),
)
_MM_TOP = (
    (r"^backbone\.(cls_token|pos_embed)$", r"\1"),
    (r"^backbone\.patch_embed\.projection\.", "patch_embed.proj."),
    (r"^backbone\.ln1\.", "norm."),  # MAEViT's final norm
    (r"^backbone\.ln2\.", "fc_norm."),  # after average pooling (out_type="avg_featmap")
    (r"^backbone\.pre_norm\.", "norm_pre."),
    (r"^neck\.ln1\.", "decoder_norm."),  # MAEPretrainDecoder's norm
    (r"^neck\.(decoder_embed|decoder_pred)\.", r"\1."),
    (r"^neck\.(mask_token|decoder_pos_embed)$", r"\1"),
)


def from_mmpretrain(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """mmpretrain MAE keys (`MAEViT` as `backbone.`, `MAEPretrainDecoder` as `neck.`) -> this project's.

    `backbone.patch_embed.projection` -> `patch_embed.proj`; `backbone.layers.{i}` / `neck.decoder_blocks.{i}` ->
    `blocks.{i}` / `decoder_blocks.{i}` with `ln1 / ln2` -> `norm1 / norm2`, `attn.qkv`, `attn.proj` kept,
    `ffn.layers.0.0 / ffn.layers.1` -> `mlp.fc1 / fc2`; `backbone.ln1` -> `norm`, `neck.ln1` -> `decoder_norm`;
    `neck.{decoder_embed, mask_token, decoder_pos_embed, decoder_pred}` lose their prefix.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        name = _renamed(key, _MM_TOP)
        if name is None and (m := re.match(r"^(backbone\.layers|neck\.decoder_blocks)\.(\d+)\.(.+)$", key)):
            inner = _renamed(m.group(3), _MM_LAYER)
            where = "blocks" if m.group(1) == "backbone.layers" else "decoder_blocks"
            name = None if inner is None else f"{where}.{m.group(2)}.{inner}"
        out[key if name is None else name] = value
    return out


# --------------------------------------------------------------------------------------------------- detectron2

# ViTDet's ViT, pyramid and heads; after `from_detectron2` the pyramid and heads keep their names, so the same test
# tells a file before and after import (mmpretrain's `backbone.layers.` is no detectron2 key)
_DETECTRON2_PREFIXES = ("backbone.net.", "backbone.simfp_", "roi_heads.", "proposal_generator.")


def is_detectron2(sd: Mapping[str, torch.Tensor]) -> bool:
    """Whether a state dict, as read or imported into our keys, is a detectron2 model's (a ViTDet checkpoint)."""
    return any(k.startswith(_DETECTRON2_PREFIXES) for k in sd)


def from_detectron2(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ViTDet checkpoint's `backbone.net.*` is the ViT under timm names (no cls token, no final norm, plus
    `rel_pos_*` tables); the pyramid and heads keep their detectron2 names."""
    return {k[len("backbone.net."):] if k.startswith("backbone.net.") else k: v for k, v in sd.items()}


# ------------------------------------------------------------------------------------------------------ layouts

@dataclass(frozen=True)
class Layout:
    """A weights layout: its name, what writes it, how to recognise it and the pure function into our keys."""

    name: str
    what: str
    detect: Callable[[Mapping[str, torch.Tensor]], bool]
    convert: Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]


LAYOUTS: tuple[Layout, ...] = (
    Layout("detectron2", "detectron2 ViTDet checkpoint", is_detectron2, from_detectron2),
    Layout("mmpretrain", "mmpretrain MAE (backbone / neck)",
           lambda sd: any(re.match(r"backbone\.(layers\.\d+\.|patch_embed\.projection\.)", k) for k in sd),
           from_mmpretrain),
    Layout("transformers", "Hugging Face transformers ViTMAE",
           lambda sd: any(k.endswith(_HF_PATCH) for k in sd), from_transformers),
    Layout("official", "official MAE / CrossMAE / timm names", lambda sd: True, from_official),
)


def detect_layout(sd: Mapping[str, torch.Tensor]) -> Layout:
    """The first of `LAYOUTS` whose keys `sd` has (`official` when no other matches)."""
    return next(layout for layout in LAYOUTS if layout.detect(sd))


def family_of(sd: Mapping[str, torch.Tensor]) -> str | None:
    """"crossmae" or "mae" for a state dict in our keys with that decoder, else None."""
    if any(k.startswith(("wfm.", "dec_norms.")) or ".cross_attn." in k for k in sd):
        return "crossmae"
    if "decoder_embed.weight" in sd and any(k.startswith("decoder_blocks.") for k in sd):
        return "mae"
    return None


def import_state_dict(checkpoint: Any, source: str = "checkpoint") -> tuple[dict[str, torch.Tensor], Layout]:
    """A loaded weights file (any layout above) as a state dict in this project's keys, and the layout it had: the
    one import every reader of weights takes, so each tensor is checked here (`pretrain.weights.fit.check_tensors`).

    Raises:
        CheckpointError: no tensors in `checkpoint`, incomplete transformers attention, a non-finite weight, or an
            encoder tensor of another shape than its encoder.
    """
    sd = checkpoint_tensors(checkpoint, source)
    layout = detect_layout(sd)
    sd = layout.convert(sd)
    check_tensors(sd, source)
    return sd, layout


# ------------------------------------------------------------------------------------------------------ reports

_GROUPS = (
    ("decoder", re.compile(r"^(decoder_|dec_norms\.|wfm\.)")),
    ("mask_token", re.compile(r"^mask_token$")),
    ("rel_pos (ViTDet)", re.compile(r"\.rel_pos_[hw]$")),
    ("norm", re.compile(r"^norm\.")),
    ("cls_token", re.compile(r"^cls_token$")),
    ("fc_norm", re.compile(r"^fc_norm\.")),
    ("head", re.compile(r"^head\.")),
    ("detector (pyramid, heads)", re.compile(r"^(backbone\.|roi_heads\.|proposal_generator\.|pixel_)")),
    ("data preprocessor", re.compile(r"^data_preprocessor\.")),
    ("encoder", ENCODER_KEY),
)


def group_of(key: str) -> str:
    """What a key of our layout belongs to: decoder, mask_token, norm, cls_token, fc_norm, head, encoder, ..."""
    return next((name for name, pattern in _GROUPS if pattern.search(key)), "other")


def grouped(keys: Iterable[str]) -> dict[str, list[str]]:
    """Keys by `group_of`, each list sorted."""
    out: dict[str, list[str]] = defaultdict(list)
    for k in sorted(keys):
        out[group_of(k)].append(k)
    return dict(out)


def summarize(keys: Iterable[str]) -> str:
    """Keys with block indices folded: "blocks.*.attn.qkv.weight (x12), pos_embed"."""
    counts = Counter(re.sub(r"^(\w*blocks|dec_norms)\.\d+\.", r"\1.*.", k) for k in keys)
    return ", ".join(k if n == 1 else f"{k} (x{n})" for k, n in counts.items())


@dataclass
class LoadReport:
    """What a load took from a weights file, and what it left.

    Attributes:
        source: the file (or released-weights name).
        layout: the `LAYOUTS` name the file had.
        loaded: keys (ours) that went into the target.
        dropped: keys (ours) of the file the target does not take, by `group_of`.
        missing: keys of the target the file did not have (left as initialised).
        resized: one note per tensor that was resampled to fit the target.
    """

    source: str
    layout: str
    loaded: list[str] = field(default_factory=list)
    dropped: dict[str, list[str]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"{self.source}: {self.layout} layout, loaded {len(self.loaded)} tensors"]
        out += [f"  dropped {group} ({len(keys)}): {summarize(keys)}" for group, keys in self.dropped.items()]
        if self.missing:
            out.append(f"  missing ({len(self.missing)}, left as initialised): {summarize(self.missing)}")
        out += [f"  resized {note}" for note in self.resized]
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "layout": self.layout, "loaded": len(self.loaded), "dropped": self.dropped,
                "missing": self.missing, "resized": self.resized}
