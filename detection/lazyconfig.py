"""Reading a detectron2 LazyConfig safely: overrides whose key does not exist are refused (detectron2 would create
them silently), the ViT a config builds is read off its `model.backbone.net` (`target_from_config`), so that
a converted checkpoint can be checked against it before a run starts, and the files of its datasets are found
(`config_datasets`).

`TARGET_KEYS` are the fields of a ViT that a weights file must fit: width, depth, patch and pretraining size.
"""
from __future__ import annotations

import difflib
import inspect
from collections.abc import Sequence
from pathlib import Path

from detectron2.config import LazyConfig
from detectron2.utils.registry import locate
from omegaconf import DictConfig

from pretrain.errors import ConfigError

from .datasets import dataset_files
from .vit import ViT

__all__ = ["TARGET_KEYS", "check_overrides", "target_from_config", "config_datasets"]

TARGET_KEYS = ("embed_dim", "depth", "patch_size", "pretrain_img_size")


def check_overrides(cfg: DictConfig, opts: list[str]) -> None:
    """Refuse `key=value` overrides whose key the config does not have (a typo would be ignored silently).

    A key is known if it is in the config, or if its node is a LazyCall whose target takes it as an argument
    (e.g. `model.backbone.net.freeze`, a ViT argument the config leaves at its default).

    Raises:
        ConfigError: the first unknown key, with the closest known ones.
    """
    for opt in opts:
        key = opt.split("=", 1)[0]
        if "=" not in opt or not key:
            raise ConfigError(f"override {opt!r} is not key=value; e.g. train.max_iter=1000")
        node, parts = cfg, key.split(".")
        for depth, part in enumerate(parts):
            known = list(node.keys()) if isinstance(node, DictConfig) else []
            if part in known:
                node = node[part]
                continue
            target = node.get("_target_") if isinstance(node, DictConfig) else None
            target = locate(target) if isinstance(target, str) else target
            if depth == len(parts) - 1 and target is not None:
                params = inspect.signature(target).parameters
                if part in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
                    break
                known += list(params)
            near = difflib.get_close_matches(part, known, n=2)
            where = ".".join(parts[:depth]) or "the config"
            hint = f"; did you mean {' or '.join('.'.join([*parts[:depth], n]) for n in near)}?" if near else ""
            raise ConfigError(f"override {key}: {where} has no key {part!r}{hint}")


def target_from_config(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, int]:
    """embed_dim / depth / patch_size / pretrain_img_size of `model.backbone.net` in a detectron2 LazyConfig.

    Fields the config leaves out take `ViT`'s defaults, as they will when the config is instantiated.

    Args:
        path: the LazyConfig file.
        overrides: `key=value` overrides applied first, as train_net will apply them (e.g.
            "model.backbone.net.pretrain_img_size=448" for an encoder pretrained at 448 px).

    Raises:
        ConfigError: the file does not exist, has no `model.backbone.net`, or an override names no config key.
    """
    if not Path(path).is_file():
        raise ConfigError(f"config {path} not found; see configs/COCO/ and configs/demo/")
    cfg = LazyConfig.load(str(path))
    check_overrides(cfg, list(overrides))
    try:
        net = LazyConfig.apply_overrides(cfg, list(overrides)).model.backbone.net
    except AttributeError:
        raise ConfigError(f"{path} has no model.backbone.net; give a ViTDet config") from None
    defaults = inspect.signature(ViT).parameters
    return {k: net.get(k, defaults[k].default) for k in TARGET_KEYS}


def config_datasets(path: str | Path) -> tuple[tuple[str, str], tuple[str, str]]:
    """(json, image folder) of the first train and the first test dataset of a LazyConfig.

    Loading the config registers the built-in sets it defines; `detection.datasets.dataset_files` resolves a
    registered name to its files.

    Raises:
        ConfigError: the file does not exist.
        DataError: a dataset is not registered or has no files.
    """
    if not Path(path).is_file():
        raise ConfigError(f"config {path} not found; see configs/COCO/ and configs/demo/")
    cfg = LazyConfig.load(str(path))
    names = [cfg.dataloader.train.dataset.names, cfg.dataloader.test.dataset.names]
    first = [n if isinstance(n, str) else n[0] for n in names]
    return dataset_files(first[0]), dataset_files(first[1])
