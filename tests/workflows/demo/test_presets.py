"""The demo's presets (`workflows.demo.presets`): budgets merged over a preset, `--set KEY=VALUE` changes checked
against the preset's keys and types."""
from pathlib import Path

import pytest

from pretrain.errors import ConfigError
from workflows.demo import presets, pretraining


def test_budget_merges_over_the_preset():
    base, long = presets.load_preset("tiny"), presets.load_preset("tiny", "long")
    assert long["pretrain"]["epochs"] > base["pretrain"]["epochs"] and long["detection"]["frozen"]
    assert long["pretrain"]["batch_size"] == base["pretrain"]["batch_size"]  # untouched keys stay
    assert (base["budget"], long["budget"]) == ("default", "long")


def test_set_changes_preset_settings_and_refuses_unknown_keys():
    base = presets.load_preset("tiny")
    cfg = presets.apply_settings(base, ["pretrain.blr=8e-3", "crossmae_prediction_ratio=0.75", "pretrain.min_lr=1e-6",
                                     "probe.pool=mean"])
    assert cfg["pretrain"]["blr"] == 0.008 and isinstance(cfg["pretrain"]["blr"], float)  # 8e-3 is a str to YAML
    assert cfg["crossmae_prediction_ratio"] == 0.75 and cfg["pretrain"]["min_lr"] == 1e-6  # a trainer key
    assert cfg["probe"]["pool"] == "mean" and cfg["set"][0] == "pretrain.blr=8e-3"
    assert base["pretrain"]["blr"] == 4e-3 and "set" not in base  # the preset itself is untouched
    assert pretraining.pretrain_config("crossmae", cfg, Path("x"), 0, "x")["prediction_ratio"] == 0.75
    for bad, words in (("pretrain.blr", "KEY=VALUE"), ("pretrain.bogus=1", "no setting pretrain.bogus"),
                       ("detection.iters.x=1", "not a section"), ("probe.min_lr=0", "no setting probe.min_lr"),
                       ("pretrain.seed=3", "use --seeds"), ("budget=long", "use --budget"),
                       ("probe.k=abc", "is int"), ("detection=1", "is dict"), ("pretrain.blr=nan", "not a finite"),
                       ("pretrain.epochs=2.5", "is int"), ("probe.k=[", "not a YAML value"),
                       ("pretrain.trust_pickle=true", "reads only files it wrote")):
        with pytest.raises(ConfigError, match=words):
            presets.apply_settings(base, [bad])
    assert presets.apply_settings(base, ["pretrain.min_lr=0"])["pretrain"]["min_lr"] == 0  # an int for a float
