"""Pretraining configuration: defaults, recipe files, command-line overrides, learning-rate rule.

The resolved configuration is a plain dict (YAML/JSON types only) so it is written next to the
run and stored in checkpoints that load with `torch.load(weights_only=True)`.
Precedence: DEFAULTS < recipe file (`--config`, itself merged over the recipes its `base:` names)
< flags given on the command line.
"""
from __future__ import annotations

import argparse
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from ..models import VIT_SIZES, model_info

DEFAULTS: dict[str, Any] = {
    "model": "crossmae_vit_tiny_patch16",
    "batch_size": 64,  # per process; effective = batch_size * accum_iter * world_size
    "epochs": 400,
    "accum_iter": 1,
    "step_partial_accum": False,  # also step on an epoch's last, partial accumulation group (official: dropped)
    "input_size": 224,
    "mask_ratio": 0.75,
    "prediction_ratio": 0.75,  # CrossMAE only: fraction of all patches reconstructed
    "decoder_depth": None,  # None: the model's default (CrossMAE 12, MAE 8)
    "model_kwargs": {},  # recipe-only: further builder overrides, e.g. {decoder_embed_dim: 256}
    "use_fm": None,  # CrossMAE: encoder blocks the decoder reads, official meaning ([-1]: all); None: all
    "norm_pix_loss": True,
    "weight_decay": 0.05,
    "lr": None,  # absolute lr; None: derived from blr (see resolve_lr)
    "blr": 1.5e-4,
    "lr_prediction_scale": "proportional",
    "min_lr": 0.0,
    "warmup_epochs": 40,
    "data_path": "builtin",
    "builtin_size": 2048,  # images in the built-in source
    "cache_images": False,  # decode image files once and keep them in memory (small sets only)
    "shuffle_buffer": 2000,  # sharded data: samples each data-loader worker shuffles in (0: none; pretrain.data.shards)
    "init_from": "",  # start from the encoder tensors of this checkpoint instead of a fresh init
    "output_dir": "output/pretrain",
    "resume": "",
    "num_workers": 4,
    "seed": 0,
    "device": "auto",
    "save_every": 20,  # epochs between numbered checkpoints (checkpoint-last.pth is written every epoch)
    "snapshot_every": 0,  # epochs between weights-only snapshots (0: none; else also one at step 0)
    "vis_every": 10,  # epochs between reconstruction grids
    "log_every": 10,  # iterations between TensorBoard scalars
    "loss_spike_factor": 10.0,  # stop at a loss over this x the recent median (0: off; rule: engine.SpikeGuard)
    "overwrite": False,  # replace an earlier run in output_dir instead of refusing
    "trust_pickle": False,  # command line only: let --resume / --init_from files unpickle Python objects
    "compile": False,  # torch.compile the training forward (off until measured to help: docs/results/benchmark_cpu.md)
    "cpu_bf16": False,  # bf16 autocast on CPU too (CUDA always uses it); faster where the CPU has bf16 instructions
    "fsdp": False,  # FSDP2 instead of DDP, with sharded checkpoint folders (training/sharding.py)
    "activation_checkpointing": False,  # recompute each block's activations in the backward pass
}

# What each key holds; "?" admits None. Values from YAML recipes are checked against it, so `epochs: "ten"`,
# `batch_size: 8.5` or a quoted `"no"` for a flag fail at once rather than deep inside a run.
TYPES: dict[str, str] = {
    "model": "str", "batch_size": "int", "epochs": "int", "accum_iter": "int", "step_partial_accum": "bool",
    "input_size": "int", "mask_ratio": "float", "prediction_ratio": "float", "decoder_depth": "int?",
    "model_kwargs": "dict", "use_fm": "ints?",
    "norm_pix_loss": "bool", "weight_decay": "float", "lr": "float?", "blr": "float", "lr_prediction_scale": "str",
    "min_lr": "float", "warmup_epochs": "float", "data_path": "str?", "builtin_size": "int", "cache_images": "bool",
    "shuffle_buffer": "int",
    "init_from": "str", "output_dir": "str", "resume": "str", "num_workers": "int", "seed": "int", "device": "str",
    "save_every": "int", "snapshot_every": "int", "vis_every": "int", "log_every": "int", "loss_spike_factor": "float",
    "overwrite": "bool", "trust_pickle": "bool", "compile": "bool", "cpu_bf16": "bool", "fsdp": "bool", "activation_checkpointing": "bool",
}
_MINIMUM = {"batch_size": 1, "epochs": 1, "accum_iter": 1, "input_size": 1, "builtin_size": 1, "num_workers": 0,
            "shuffle_buffer": 0,
            "save_every": 1, "snapshot_every": 0, "vis_every": 1, "log_every": 1, "warmup_epochs": 0, "min_lr": 0,
            "weight_decay": 0, "loss_spike_factor": 0, "decoder_depth": 1}

LR_PREDICTION_SCALES = ("proportional", "inverse", "none")


def resolve_lr(cfg: dict[str, Any], world_size: int) -> float:
    """Absolute learning rate from the base rate, as in MAE and CrossMAE.

    `lr = blr * effective_batch / 256` (MAE's linear scaling rule). CrossMAE's released trainer
    further multiplies by `prediction_ratio / mask_ratio` (its default, here "proportional"),
    by the inverse of that ("inverse"), or by 1 ("none"). For MAE the ratio is 1 by definition.
    An explicit `lr` wins over all of this.
    """
    if cfg["lr"] is not None:
        return float(cfg["lr"])
    eff_batch = cfg["batch_size"] * cfg["accum_iter"] * world_size
    is_cross = model_info(cfg["model"]).family == "crossmae"
    ratio = cfg["prediction_ratio"] / cfg["mask_ratio"] if is_cross else 1.0
    scale = {"proportional": ratio, "inverse": 1.0 / ratio, "none": 1.0}[cfg["lr_prediction_scale"]]
    return scale * cfg["blr"] * eff_batch / 256


def build_parser() -> argparse.ArgumentParser:
    """Flags follow MAE's main_pretrain.py; every default is None so only given flags override."""
    p = argparse.ArgumentParser("MAE / CrossMAE pretraining", argument_default=None,
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=(
        "Writes into --output_dir: config.yaml, checkpoint-last.pth (every epoch), checkpoint-<epoch>.pth\n"
        "(every --save_every epochs and the last), log.txt, tensorboard/, recon/ (every --vis_every epochs)\n"
        "and, with --snapshot_every, snapshots/. With --fsdp the checkpoints are folders checkpoint-*.dcp/.\n"
        "MAE against CrossMAE from one step-0 encoder, with the not-pretrained control and the probe:\n"
        "docs/pretraining.md#fair-comparison"))
    p.add_argument("--config", help="recipe YAML, e.g. configs/pretrain/crossmae_vit_base_800ep.yaml")
    p.add_argument("--model", help="registered model name, e.g. crossmae_vit_base_patch16")
    p.add_argument("--batch_size", type=int, help="batch size per process")
    p.add_argument("--epochs", type=int)
    p.add_argument("--accum_iter", type=int, help="gradient accumulation steps")
    p.add_argument("--step_partial_accum", action=argparse.BooleanOptionalAction,
                   help="also step the optimizer on an epoch's last, partial accumulation group (the official "
                        "MAE / CrossMAE trainers drop it, the default)")
    p.add_argument("--input_size", type=int)
    p.add_argument("--mask_ratio", type=float, help="fraction of patches hidden from the encoder")
    p.add_argument("--prediction_ratio", "--kept_mask_ratio", dest="prediction_ratio", type=float,
                   help="CrossMAE: fraction of all patches reconstructed (<= mask_ratio)")
    p.add_argument("--decoder_depth", type=int)
    p.add_argument("--use_fm", nargs="+", type=int,
                   help="CrossMAE: encoder blocks whose outputs the decoder's feature weighting reads, as in the "
                        "official code: -1 alone means all blocks (the default), otherwise block indices, "
                        "negative ones counted from the end (e.g. --use_fm 5 11)")
    p.add_argument("--norm_pix_loss", action=argparse.BooleanOptionalAction)
    p.add_argument("--weight_decay", type=float)
    p.add_argument("--lr", type=float, help="absolute learning rate (overrides --blr)")
    p.add_argument("--blr", type=float, help="base lr: lr = blr * effective_batch / 256")
    p.add_argument("--lr_prediction_scale", choices=LR_PREDICTION_SCALES,
                   help="CrossMAE's extra lr factor prediction_ratio/mask_ratio (proportional, its default), "
                        "its inverse, or none")
    p.add_argument("--min_lr", type=float)
    p.add_argument("--warmup_epochs", type=float)
    _run_args(p)
    return p


def add_sharding_args(p: argparse.ArgumentParser, folders: str) -> None:
    """`--fsdp` and `--activation_checkpointing`, for pretraining and fine-tuning; `folders`: what the checkpoint
    folders of an --fsdp run are and do."""
    p.add_argument("--fsdp", action=argparse.BooleanOptionalAction,
                   help="shard parameters, gradients and optimizer state over the processes (FSDP2, per block) instead "
                        f"of DDP; checkpoints become folders {folders}")
    p.add_argument("--activation_checkpointing", action=argparse.BooleanOptionalAction,
                   help="recompute each transformer block's activations in the backward pass instead of keeping "
                        "them: less memory, about one more forward of compute (with DDP or --fsdp)")


def _run_args(p: argparse.ArgumentParser) -> None:
    """The flags of data, output folder, resume, schedule of records, divergence guard, compile, sharding and
    trust."""
    p.add_argument("--data_path", help="ImageNet-layout root holding train/<class>/<image>, a folder of images, "
                                       "'builtin', or webdataset shards of tools/make_shards.py: their folder (holding "
                                       "shards.json) or a brace pattern such as /data/train-{000000..000127}.tar")
    p.add_argument("--builtin_size", type=int, help="number of built-in images (with --data_path builtin)")
    p.add_argument("--cache_images", action=argparse.BooleanOptionalAction,
                   help="decode image files once and keep them in memory (small sets)")
    p.add_argument("--shuffle_buffer", type=int,
                   help="sharded data: samples each data-loader worker holds to shuffle (default 2000, about 220 MB "
                        "of ImageNet JPEGs; 0: none)")
    p.add_argument("--init_from", help="start from the encoder tensors of this weights file or release name instead "
                                       "of a fresh init, e.g. another run's snapshots/step-0000000.pth to start two "
                                       "methods from one encoder (the same --seed alone gives MAE and CrossMAE "
                                       "different ones)")
    p.add_argument("--output_dir", help="the run's folder (default output/pretrain); what it holds: below; a second "
                                        "run into a folder in use is refused")
    p.add_argument("--resume", help="checkpoint to resume from, or 'auto': OUTPUT_DIR/checkpoint-last.pth, else its "
                                    "newest checkpoint-<epoch>.pth, else a new run (the log says which)")
    p.add_argument("--num_workers", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto, cpu or cuda")
    p.add_argument("--save_every", type=int)
    p.add_argument("--snapshot_every", type=int,
                   help="epochs between weights-only snapshots OUTPUT_DIR/snapshots/step-<step>.pth (0: none, the "
                        "default); a new run with snapshots also writes snapshots/step-0000000.pth, its weights "
                        "before the first step")
    p.add_argument("--vis_every", type=int)
    p.add_argument("--log_every", type=int)
    p.add_argument("--loss_spike_factor", type=float,
                   help="stop when an iteration's loss exceeds this x the median of the last 50 (restored on resume; "
                        "taken as at least 1 while fewer than 20 are known), from the second iteration of a new run "
                        "and the first of a resumed one (default 10; 0: off; non-finite losses always stop)")
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the model's training forward (the first steps compile it; off by default)")
    p.add_argument("--cpu_bf16", action="store_true", default=None,
                   help="bf16 autocast on CPU as on CUDA (off by default: fp32 on CPU); about 1.7x faster steps on a "
                        "CPU with AVX-512 BF16 (docs/results/benchmark_cpu.md)")
    add_sharding_args(p, "checkpoint-*.dcp/ that resume at any number of processes (one process: nothing to shard, "
                         "same folders); not with --compile")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="replace an earlier run in --output_dir instead of refusing (see --resume auto)")
    p.add_argument("--trust-pickle", dest="trust_pickle", action="store_true", default=None,
                   help="allow --resume / --init_from files that unpickle Python objects (e.g. released checkpoints "
                        "storing args): only for files you trust, since loading them runs their code")


def load_recipe(path: str | Path, known: Mapping[str, Any] = DEFAULTS, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe YAML merged over the recipe its optional `base:` key names (a path relative to it), recursively.

    `known` holds the config keys a recipe may set (pretraining's `DEFAULTS`, or fine-tuning's).

    Raises:
        ConfigError: a missing or malformed file, a `base:` cycle, or a key that is not a config key.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} not found; see configs/ for the shipped ones")
    if path.resolve() in _seen:
        raise ConfigError(f"recipe {path} is its own base (through {' -> '.join(map(str, _seen))}); break the cycle")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path} is not valid YAML ({' '.join(str(e).split())}); fix the file") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"recipe {path} holds a {type(loaded).__name__}, not a mapping of config keys")
    base = loaded.pop("base", None)
    unknown = sorted(set(loaded) - set(known))
    if unknown:
        raise ConfigError(f"{path} has unknown keys {unknown}; known keys: {sorted(known)}")
    if "trust_pickle" in loaded:
        raise ConfigError(f"{path} sets trust_pickle: only the command line (--trust-pickle) may trust a file to run "
                          "code; drop the key")
    if base is None:
        return loaded
    return {**load_recipe(path.parent / str(base), known, (*_seen, path.resolve())), **loaded}


def load_config(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse flags, merge them over the recipe and the defaults, and validate the result."""
    args = vars(build_parser().parse_args(argv))
    cfg = dict(DEFAULTS)
    recipe = args.pop("config")
    if recipe:
        cfg.update(load_recipe(recipe))
        cfg["recipe"] = str(recipe)
    cfg.update({k: v for k, v in args.items() if v is not None})
    validate(cfg)
    return cfg


def validate(cfg: dict[str, Any]) -> None:
    """Reject values that would fail later, with a one-line reason.

    Raises:
        ConfigError: the first unusable value.
    """
    def bad(msg: str) -> None:
        raise ConfigError(msg)

    check_values(cfg, TYPES, _MINIMUM)
    for key in ("blr", "lr"):
        if cfg[key] is not None and cfg[key] <= 0:
            bad(f"--{key} must be > 0, got {cfg[key]}")
    if cfg["device"] != "auto" and not re.fullmatch(r"cpu|cuda(:\d+)?", cfg["device"]):
        bad(f"--device {cfg['device']!r} is not a device; use auto, cpu, cuda or cuda:N")
    try:
        info = model_info(cfg["model"])
    except ValueError as e:
        raise ConfigError(f"--model: {e}") from None
    patch = cfg["model_kwargs"].get("patch_size", info.patch_size)
    if cfg["input_size"] % patch:
        bad(f"--input_size {cfg['input_size']} is not a multiple of the patch size {patch}; use e.g. "
            f"{max(patch, cfg['input_size'] // patch * patch)}")
    if not 0.0 < cfg["mask_ratio"] < 1.0:
        bad(f"--mask_ratio must be in (0, 1), got {cfg['mask_ratio']}")
    if not 0.0 < cfg["prediction_ratio"] <= cfg["mask_ratio"]:
        bad(f"--prediction_ratio must be in (0, mask_ratio={cfg['mask_ratio']}], got {cfg['prediction_ratio']}: "
            "CrossMAE cannot reconstruct more than is masked")
    for key in ("batch_size", "epochs", "accum_iter", "input_size"):
        if int(cfg[key]) < 1:
            bad(f"--{key} must be >= 1, got {cfg[key]}")
    if cfg["warmup_epochs"] > cfg["epochs"]:
        bad(f"--warmup_epochs ({cfg['warmup_epochs']}) exceeds --epochs ({cfg['epochs']}): lower --warmup_epochs")
    if cfg["lr_prediction_scale"] not in LR_PREDICTION_SCALES:
        bad(f"lr_prediction_scale must be one of {LR_PREDICTION_SCALES}, got {cfg['lr_prediction_scale']!r}")
    if cfg["use_fm"] is not None:
        if info.family != "crossmae" and cfg["use_fm"] != [-1]:
            bad(f"--use_fm selects CrossMAE's feature maps; {cfg['model']} is an MAE model: drop --use_fm")
        if "use_fm" in cfg["model_kwargs"]:
            bad("use_fm is given twice (as use_fm and in model_kwargs); keep the use_fm key, whose -1 means all "
                "blocks as in the official code")
        depth = cfg["model_kwargs"].get("depth", VIT_SIZES[info.size]["depth"])
        if not cfg["use_fm"] or any(not -depth <= i < depth for i in cfg["use_fm"]):
            bad(f"--use_fm {cfg['use_fm']} names blocks outside the encoder's {depth}; use indices from "
                f"{-depth} to {depth - 1}, or -1 alone for all")
    if cfg["fsdp"] and cfg["compile"]:
        bad("--fsdp with --compile is untested here (FSDP2's per-block hooks under a whole-model compile); drop one")
    if cfg["data_path"] in (None, ""):
        bad("--data_path is required: an ImageNet-layout root holding train/<class>/<image>, or 'builtin'")


def check_values(cfg: dict[str, Any], types: dict[str, str], minimum: dict[str, float]) -> None:
    """Every key's type (`check_type`, finite numbers included) and lower bound: the checks that pretraining's and
    fine-tuning's configs share.

    Raises:
        ConfigError: the first value of another type, not finite, or under its minimum.
    """
    for key, kind in types.items():
        check_type(key, cfg[key], kind)
    for key, low in minimum.items():
        if cfg[key] is not None and cfg[key] < low:
            raise ConfigError(f"--{key} must be >= {low}, got {cfg[key]}")


def check_type(key: str, value: Any, kind: str) -> None:
    """Raise a one-line ConfigError unless `value` is of `kind` ("int", "float", "bool", "str", "dict", "ints" (a
    list of ints), "floats" (a list of numbers); a trailing "?" admits None). Numbers must be finite: NaN passes every
    comparison of the range checks, and an infinite rate or factor is no setting."""
    if kind.endswith("?"):
        if value is None:
            return
        kind = kind[:-1]
    ok = {"int": isinstance(value, int) and not isinstance(value, bool),
          "ints": isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value),
          "float": isinstance(value, (int, float)) and not isinstance(value, bool),
          "floats": isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                    for v in value),
          "bool": isinstance(value, bool), "str": isinstance(value, str), "dict": isinstance(value, dict)}[kind]
    if not ok:
        hint = {"bool": "write true or false, unquoted", "int": "write a whole number", "float": "write a number",
                "ints": "write a list of whole numbers, e.g. [-1]", "floats": "write a list of numbers",
                "str": "write a string", "dict": "write a mapping"}[kind]
        article = {"int": "an int", "ints": "a list of ints", "floats": "a list of numbers"}.get(kind, f"a {kind}")
        raise ConfigError(f"{key} must be {article}, got {value!r} "
                          f"({type(value).__name__}); {hint}")
    if kind.startswith("float") and not all(math.isfinite(v) for v in (value if kind == "floats" else [value])):
        raise ConfigError(f"--{key} must be a finite number, got {value}")
