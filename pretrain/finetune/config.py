"""Fine-tuning configuration: MAE's `main_finetune.py` flags and defaults, recipe files, and their checks.

Precedence as in pretraining: DEFAULTS < recipe (`--config`, merged over its `base:`) < flags on the command line.
The resolved config is a plain dict, stored in checkpoints that load with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import argparse
import re
from typing import Any

from ..errors import ConfigError
from ..models import VIT_SIZES
from ..training.config import add_sharding_args, check_values, load_recipe

# MAE's `models_vit` names: vit_{size}_patch{patch} for each size of the one table
MODELS: dict[str, str] = {f"vit_{size}_patch{spec['patch_size']}": size for size, spec in VIT_SIZES.items()}

DEFAULTS: dict[str, Any] = {
    "model": "vit_base_patch16",
    "model_kwargs": {},  # recipe-only: overrides of the size table (embed_dim, depth, num_heads, patch_size)
    "finetune": "",  # the pretrained weights (any file the converter reads, or a release name); '' = random init
    "batch_size": 64,  # per process; effective = batch_size * accum_iter * world_size
    "epochs": 50,
    "accum_iter": 1,
    "input_size": 224,
    "drop_path": 0.1,
    "clip_grad": None,
    "weight_decay": 0.05,
    "lr": None,  # absolute lr; None: blr * effective_batch / 256
    "blr": 1e-3,
    "layer_decay": 0.75,
    "min_lr": 1e-6,
    "warmup_epochs": 5.0,
    "color_jitter": None,
    "aa": "rand-m9-mstd0.5-inc1",  # timm RandAugment
    "smoothing": 0.1,
    "reprob": 0.25,
    "remode": "pixel",
    "recount": 1,
    "mixup": 0.0,
    "cutmix": 0.0,
    "cutmix_minmax": None,
    "mixup_prob": 1.0,
    "mixup_switch_prob": 0.5,
    "mixup_mode": "batch",
    "global_pool": True,  # average the patch tokens (fc_norm); False: the class token (--cls_token)
    "nb_classes": None,  # None: the number of class folders in train/
    "data_path": "",
    "output_dir": "output/finetune",
    "resume": "",
    "eval": False,
    "num_workers": 4,
    "seed": 0,
    "device": "auto",
    "overwrite": False,
    "trust_pickle": False,
    "fsdp": False,  # FSDP2 instead of DDP, with sharded checkpoint folders (pretrain.training.sharding)
    "activation_checkpointing": False,  # recompute each block's activations in the backward pass
}

TYPES: dict[str, str] = {
    "model": "str", "model_kwargs": "dict", "finetune": "str", "batch_size": "int", "epochs": "int",
    "accum_iter": "int", "input_size": "int",
    "drop_path": "float", "clip_grad": "float?", "weight_decay": "float", "lr": "float?", "blr": "float",
    "layer_decay": "float", "min_lr": "float", "warmup_epochs": "float", "color_jitter": "float?", "aa": "str?",
    "smoothing": "float", "reprob": "float", "remode": "str", "recount": "int", "mixup": "float", "cutmix": "float",
    "cutmix_minmax": "floats?", "mixup_prob": "float", "mixup_switch_prob": "float", "mixup_mode": "str",
    "global_pool": "bool", "nb_classes": "int?", "data_path": "str", "output_dir": "str", "resume": "str",
    "eval": "bool", "num_workers": "int", "seed": "int", "device": "str", "overwrite": "bool",
    "trust_pickle": "bool", "fsdp": "bool", "activation_checkpointing": "bool",
}
_MINIMUM = {"batch_size": 1, "epochs": 1, "accum_iter": 1, "input_size": 1, "drop_path": 0,
            "weight_decay": 0, "min_lr": 0, "warmup_epochs": 0, "smoothing": 0, "reprob": 0, "recount": 1, "mixup": 0,
            "cutmix": 0, "mixup_prob": 0, "mixup_switch_prob": 0, "nb_classes": 2, "num_workers": 0}
_AT_MOST_ONE = ("drop_path", "smoothing", "reprob", "mixup_prob", "mixup_switch_prob")


def resolve_lr(cfg: dict[str, Any], world_size: int) -> float:
    """`lr`, else MAE's rule `blr * effective_batch / 256`."""
    if cfg["lr"] is not None:
        return float(cfg["lr"])
    return cfg["blr"] * cfg["batch_size"] * cfg["accum_iter"] * world_size / 256


def build_parser() -> argparse.ArgumentParser:
    """Flags and meanings of MAE's main_finetune.py; every default is None so only given flags override."""
    p = argparse.ArgumentParser(description="ViT fine-tuning for classification, MAE's recipe and flags",
                                argument_default=None)
    p.add_argument("--config", help="recipe YAML, e.g. configs/finetune/vit_base.yaml")
    p.add_argument("--model", choices=sorted(MODELS), help="the classifier's ViT (default vit_base_patch16)")
    p.add_argument("--finetune", help="pretrained weights: any file tools/convert_pretrain_to_d2.py reads, or a "
                                      "released-weights name; its encoder initialises the classifier")
    p.add_argument("--batch_size", type=int, help="batch size per process")
    p.add_argument("--epochs", type=int)
    p.add_argument("--accum_iter", type=int, help="gradient accumulation steps")
    p.add_argument("--input_size", type=int, help="image side; the position embedding is resized to it")
    p.add_argument("--drop_path", type=float, help="stochastic depth rate")
    p.add_argument("--clip_grad", type=float, help="clip the gradient norm (default: none)")
    p.add_argument("--weight_decay", type=float)
    p.add_argument("--lr", type=float, help="absolute learning rate (overrides --blr)")
    p.add_argument("--blr", type=float, help="base lr: lr = blr * effective_batch / 256")
    p.add_argument("--layer_decay", type=float, help="lr factor per ViT layer, in (0, 1]")
    p.add_argument("--min_lr", type=float)
    p.add_argument("--warmup_epochs", type=float)
    p.add_argument("--color_jitter", type=float, help="colour jitter factor (only without RandAugment)")
    p.add_argument("--aa", help="timm auto-augment policy, default rand-m9-mstd0.5-inc1; 'none' for none")
    p.add_argument("--smoothing", type=float, help="label smoothing")
    p.add_argument("--reprob", type=float, help="random erasing probability")
    p.add_argument("--remode", help="random erasing mode")
    p.add_argument("--recount", type=int, help="random erasing count")
    p.add_argument("--mixup", type=float, help="mixup alpha (0: off)")
    p.add_argument("--cutmix", type=float, help="cutmix alpha (0: off)")
    p.add_argument("--cutmix_minmax", type=float, nargs=2, help="cutmix min/max ratio (overrides --cutmix)")
    p.add_argument("--mixup_prob", type=float)
    p.add_argument("--mixup_switch_prob", type=float)
    p.add_argument("--mixup_mode", choices=("batch", "pair", "elem"))
    p.add_argument("--global_pool", action="store_true", default=None,
                   help="average-pool the patch tokens (the default)")
    p.add_argument("--cls_token", action="store_false", dest="global_pool", default=None,
                   help="classify the class token instead")
    p.add_argument("--nb_classes", type=int, help="classes (default: the class folders of DATA_PATH/train)")
    p.add_argument("--data_path", help="ImageNet-layout root holding train/<class>/<image> and val/<class>/<image>")
    p.add_argument("--output_dir")
    p.add_argument("--resume", help="a fine-tuning checkpoint to continue, 'auto' for OUTPUT_DIR/checkpoint-last.pth "
                                    "(or .dcp/ with --fsdp; also the position of a preempted run inside its epoch); "
                                    "with --eval, the fine-tuned weights to evaluate (also a checkpoint folder, or a "
                                    "release name such as crossmae_vit_base_finetune)")
    p.add_argument("--eval", action="store_true", default=None, help="only evaluate --resume on DATA_PATH/val")
    p.add_argument("--num_workers", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto, cpu or cuda")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an earlier run in --output_dir")
    add_sharding_args(p, "checkpoint-last.dcp/ and checkpoint-best.dcp/ that resume at any number of processes and "
                         "--eval reads")
    p.add_argument("--trust-pickle", dest="trust_pickle", action="store_true", default=None,
                   help="allow weights files that unpickle Python objects (e.g. MAE's releases storing args): only "
                        "for files you trust, since loading them runs their code")
    return p


def load_config(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse flags, merge them over the recipe and the defaults, and validate the result."""
    args = vars(build_parser().parse_args(argv))
    cfg = dict(DEFAULTS)
    recipe = args.pop("config")
    if recipe:
        cfg.update(load_recipe(recipe, DEFAULTS))
        cfg["recipe"] = str(recipe)
    cfg.update({k: v for k, v in args.items() if v is not None})
    if cfg["aa"] in ("none", ""):
        cfg["aa"] = None
    validate(cfg)
    return cfg


def validate(cfg: dict[str, Any]) -> None:
    """Reject values that would fail later, with a one-line reason.

    Raises:
        ConfigError: the first unusable value.
    """
    check_values(cfg, TYPES, _MINIMUM)
    if cfg["cutmix_minmax"] is not None and len(cfg["cutmix_minmax"]) != 2:
        raise ConfigError(f"cutmix_minmax must be two numbers (min max), got {cfg['cutmix_minmax']!r}")
    for key in _AT_MOST_ONE:
        if cfg[key] > 1:
            raise ConfigError(f"--{key} must be at most 1, got {cfg[key]}")
    for key in ("blr", "lr", "clip_grad"):
        if cfg[key] is not None and cfg[key] <= 0:
            raise ConfigError(f"--{key} must be > 0, got {cfg[key]}")
    mixing = cfg["mixup"] > 0 or cfg["cutmix"] > 0 or cfg["cutmix_minmax"] is not None
    if mixing and cfg["batch_size"] % 2:
        raise ConfigError(f"--batch_size {cfg['batch_size']} is odd, and Mixup / CutMix pair the images of a batch; "
                          "give an even batch size")
    if not 0.0 < cfg["layer_decay"] <= 1.0:
        raise ConfigError(f"--layer_decay must be in (0, 1] (1: no decay), got {cfg['layer_decay']}")
    if cfg["model"] not in MODELS:
        raise ConfigError(f"--model {cfg['model']!r} is not a fine-tuning model; use one of {sorted(MODELS)}")
    unknown = sorted(set(cfg["model_kwargs"]) - {"embed_dim", "depth", "num_heads", "patch_size"})
    if unknown:
        raise ConfigError(f"model_kwargs {unknown} are not ViT sizes; use embed_dim, depth, num_heads, patch_size")
    patch = cfg["model_kwargs"].get("patch_size", VIT_SIZES[MODELS[cfg["model"]]]["patch_size"])
    if cfg["input_size"] % patch:
        raise ConfigError(f"--input_size {cfg['input_size']} is not a multiple of the patch size {patch}; use e.g. "
                          f"{max(patch, cfg['input_size'] // patch * patch)}")
    if cfg["warmup_epochs"] > cfg["epochs"]:
        raise ConfigError(f"--warmup_epochs ({cfg['warmup_epochs']}) exceeds --epochs ({cfg['epochs']}): lower it")
    if cfg["device"] != "auto" and not re.fullmatch(r"cpu|cuda(:\d+)?", cfg["device"]):
        raise ConfigError(f"--device {cfg['device']!r} is not a device; use auto, cpu, cuda or cuda:N")
    if not cfg["data_path"]:
        raise ConfigError("--data_path is required: an ImageNet-layout root holding train/<class>/<image> and "
                          "val/<class>/<image>")
    if cfg["eval"] and not cfg["resume"]:
        raise ConfigError("--eval needs --resume CHECKPOINT, the fine-tuned weights to evaluate")
