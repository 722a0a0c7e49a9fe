"""The demo's presets (`configs/demo/<name>.yaml`), their budgets, and `--set KEY=VALUE` changes over them.

A preset holds every setting of a demo run; `budgets: NAME:` in it is merged over the rest by `--budget NAME`.
`apply_settings` checks each `--set` item against the preset (or, under `pretrain`, the trainer's config): the key
must exist, the value must be of the type it replaces, and settings the demo sets itself are refused with what to
use instead.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from pretrain.errors import ConfigError
from pretrain.training.config import DEFAULTS

ROOT = Path(__file__).resolve().parents[2]  # the source checkout: configs/ and tools/ live there
CONFIGS = ROOT / "configs"
DEMO_CONFIGS = CONFIGS / "demo"

__all__ = ["ROOT", "CONFIGS", "DEMO_CONFIGS", "DEMO_OWNED", "presets", "load_preset", "apply_settings"]


def presets() -> list[str]:
    """Names of the shipped demo presets."""
    return sorted(p.stem for p in DEMO_CONFIGS.glob("*.yaml"))


def _merge(base: dict, over: dict) -> dict:
    """Recursive dict merge: `over` wins, nested dicts merge key by key."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_preset(name: str, budget: str | None = None) -> dict[str, Any]:
    """The demo preset `configs/demo/<name>.yaml`, with `budgets: <budget>:` merged over it.

    Raises:
        ConfigError: no such preset or budget.
    """
    path = DEMO_CONFIGS / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"no demo preset {path}; pick one of {', '.join(presets())}")
    preset = yaml.safe_load(path.read_text())
    budgets = preset.pop("budgets", {}) or {}
    if budget is not None:
        if budget not in budgets:
            raise ConfigError(f"preset {name} has no budget {budget!r}; it has {', '.join(budgets) or 'none'}")
        preset = _merge(preset, budgets[budget])
    preset["name"], preset["budget"] = name, budget or "default"
    return preset


# settings the demo sets itself, which a --set would not change: trainer keys `pretrain_config` overwrites, and
# the preset's own labels; each with what to use instead
DEMO_OWNED = {"pretrain.seed": "use --seeds", "pretrain.prediction_ratio": "use crossmae_prediction_ratio",
              **dict.fromkeys(("pretrain.model", "pretrain.data_path", "pretrain.output_dir", "pretrain.resume",
                               "pretrain.lr_prediction_scale", "pretrain.init_from"), "the demo sets it per run"),
              "pretrain.trust_pickle": "the demo reads only files it wrote, which need no trust",
              "name": "use --size", "budget": "use --budget", "set": "the report fills it in"}
_TRAINER_OWNED = {k.removeprefix("pretrain.") for k in DEMO_OWNED if k.startswith("pretrain.")}


def _value(item: str, text: str) -> Any:
    """A YAML value, with numbers such as 8e-3 (a string to YAML 1.1) read as floats; NaN and infinity refused."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"--set {item}: {text!r} is not a YAML value") from None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return value
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"--set {item}: {text} is not a finite number")
    return value


def _same_kind(old: Any, new: Any) -> bool:
    """Whether `new` may replace the preset's `old`: the same type (an int where a float was is fine)."""
    if old is None or new is None:
        return True
    if isinstance(old, float) and isinstance(new, int) and not isinstance(new, bool):
        return True
    return type(old) is type(new)


def apply_settings(preset: dict, items: Sequence[str]) -> dict[str, Any]:
    """The preset with `KEY=VALUE` settings over it: dotted keys (`pretrain.blr=8e-3`,
    `crossmae_prediction_ratio=0.75`), YAML values. A key must exist in the preset, or, under `pretrain`, be a
    key of the trainer's config; the whole result is validated when the runs are built.

    Raises:
        ConfigError: an item is not KEY=VALUE or names no setting.
    """
    out = yaml.safe_load(yaml.safe_dump(preset))  # a deep copy
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r} is not KEY=VALUE; e.g. --set pretrain.blr=8e-3")
        if key in DEMO_OWNED:
            raise ConfigError(f"--set {item}: {key} is set by the demo itself; {DEMO_OWNED[key]}")
        *parents, leaf = key.split(".")
        node = out
        for depth, part in enumerate(parents):
            if not isinstance(node.get(part), dict):
                prefix, sections = ".".join(parents[:depth + 1]), [k for k, v in node.items() if isinstance(v, dict)]
                raise ConfigError(f"--set {item}: {prefix} is not a section of the preset (sections here: "
                                  f"{', '.join(sections) or 'none'}); set the whole mapping instead, e.g. "
                                  f"--set '{prefix}={{KEY: VALUE}}'")
            node = node[part]
        trainer = parents == ["pretrain"]
        known = set(node) | (set(DEFAULTS) - _TRAINER_OWNED if trainer else set())
        if leaf not in known:
            raise ConfigError(f"--set {item}: no setting {key}; there are: {', '.join(sorted(known))}")
        value = _value(item, text)
        old = node.get(leaf, DEFAULTS.get(leaf) if trainer else None)
        if not _same_kind(old, value):
            raise ConfigError(f"--set {item}: {key} is {type(old).__name__} ({old!r} now), not {type(value).__name__}")
        node[leaf] = value
    if items:
        out["set"] = list(items)
    return out
