"""Pretraining configuration (`pretrain.training.config`): flags over recipes over defaults, recipe bases, value
checks as one-line errors, the shipped recipes, `--use_fm`, and the learning-rate rule."""
from pathlib import Path

import pytest
import yaml

from pretrain.errors import ConfigError
from pretrain.models import create_model
from pretrain.training.config import DEFAULTS, load_config, resolve_lr

ROOT = Path(__file__).resolve().parents[3]
TINY = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "decoder_embed_dim": 32,
        "decoder_num_heads": 2}


def test_flags_override_recipe_and_alias(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": "mae_vit_base_patch16", "epochs": 800, "blr": 1.5e-4}))
    cfg = load_config(["--config", str(recipe), "--epochs", "3", "--warmup_epochs", "1", "--kept_mask_ratio", "0.25"])
    assert cfg["model"] == "mae_vit_base_patch16"  # from the recipe
    assert cfg["epochs"] == 3  # flag beats recipe
    assert cfg["prediction_ratio"] == 0.25  # CrossMAE's flag name is an alias
    assert cfg["batch_size"] == DEFAULTS["batch_size"]  # untouched default


@pytest.mark.parametrize("argv, message", [
    (["--prediction_ratio", "0.9"], "cannot reconstruct more than is masked"),
    (["--mask_ratio", "1.5"], "--mask_ratio must be in (0, 1)"),
    (["--config", "nope.yaml"], "nope.yaml not found"),
])
def test_bad_config_is_a_one_line_error(argv, message):
    with pytest.raises(ConfigError) as e:
        load_config(argv)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_shipped_recipes_load():
    for recipe in sorted((ROOT / "configs" / "pretrain").glob("*.yaml")):
        cfg = load_config(["--config", str(recipe), "--data_path", "builtin"])
        assert cfg["model"].split("_")[0] in ("mae", "crossmae"), recipe


def test_recipe_base_merges_and_refuses_cycles(tmp_path):
    (tmp_path / "common.yaml").write_text(yaml.safe_dump({"epochs": 800, "blr": 1.5e-4, "batch_size": 512}))
    (tmp_path / "child.yaml").write_text(yaml.safe_dump({"base": "common.yaml", "model": "mae_vit_base_patch16",
                                                         "epochs": 400, "warmup_epochs": 20}))
    cfg = load_config(["--config", str(tmp_path / "child.yaml")])
    assert (cfg["epochs"], cfg["blr"], cfg["batch_size"], cfg["model"]) == (400, 1.5e-4, 512, "mae_vit_base_patch16")
    assert "base" not in cfg
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="its own base"):
        load_config(["--config", str(tmp_path / "a.yaml")])
    (tmp_path / "typo.yaml").write_text("base: common.yaml\nepochz: 3\n")
    with pytest.raises(ConfigError, match="unknown keys \\['epochz'\\]"):
        load_config(["--config", str(tmp_path / "typo.yaml")])


def test_crossmae_recipes_are_deltas_over_the_base_recipe():
    # the released ViT-S/L/H runs share everything with ViT-B but the encoder
    def load(size: str) -> dict:
        return load_config(["--config", str(ROOT / f"configs/pretrain/crossmae_vit_{size}_800ep.yaml"),
                            "--data_path", "/data/imagenet"])

    base = load("base")
    for size in ("small", "large", "huge"):
        other = load(size)
        # the released ViT-H is the one run at prediction ratio 0.25 (vith-mr0.75-kmr0.25-dd12)
        differ = {"model", "recipe"} | ({"prediction_ratio"} if size == "huge" else set())
        assert {k for k in base if base[k] != other[k]} == differ, size
    assert load("huge")["prediction_ratio"] == 0.25


@pytest.mark.parametrize("recipe, over, changed", [
    ("mae_vit_small_400ep", "mae_vit_small_800ep", {"epochs": 400, "warmup_epochs": 20}),
    ("mae_vit_base_400ep", "mae_vit_base_800ep", {"epochs": 400, "warmup_epochs": 20}),
    ("crossmae_vit_small_400ep", "crossmae_vit_small_800ep", {"epochs": 400, "warmup_epochs": 20}),
    ("crossmae_vit_base_400ep", "crossmae_vit_base_800ep", {"epochs": 400, "warmup_epochs": 20}),
    # the released vitb-448 run: 400 epochs at 448 px, mask and prediction ratio 0.75
    ("crossmae_vit_base_448_400ep", "crossmae_vit_base_800ep", {"epochs": 400, "input_size": 448}),
])
def test_ablation_and_448_recipes_are_small_deltas(recipe, over, changed):
    def load(name: str) -> dict:
        return load_config(["--config", str(ROOT / f"configs/pretrain/{name}.yaml"), "--data_path", "/data/imagenet"])

    cfg, base = load(recipe), load(over)
    assert {k: cfg[k] for k in cfg if k != "recipe" and cfg[k] != base[k]} == changed
    if "crossmae" in recipe:
        assert (cfg["mask_ratio"], cfg["prediction_ratio"]) == (0.75, 0.75)


def _crossmae_from_flags(*flags: str):
    cfg = load_config(["--model", "crossmae_vit_tiny_patch16", "--input_size", "32", *flags])
    cfg["model_kwargs"] = TINY  # 2 encoder blocks
    return cfg, create_model(cfg)


@pytest.mark.parametrize("flags, blocks", [
    ((), [0, 1]),  # default: every block, as the released runs
    (("--use_fm", "-1"), [0, 1]),  # the official default: a lone -1 means every block, not the last one
    (("--use_fm", "-2"), [0]),
    (("--use_fm", "0", "-1"), [0, 1]),
    (("--use_fm", "1"), [1]),
])
def test_use_fm_flag_means_what_the_official_code_means(flags, blocks):
    cfg, model = _crossmae_from_flags(*flags)
    assert model.use_fm == blocks
    assert model.wfm.linear.weight.shape[1] == len(blocks) + 1  # + the input map (--use_input)
    assert cfg["use_fm"] == ([int(f) for f in flags[1:]] or None)


@pytest.mark.parametrize("argv, message", [
    (["--model", "crossmae_vit_base_patch16", "--use_fm", "12"], "outside the encoder's 12"),
    (["--model", "mae_vit_base_patch16", "--use_fm", "3"], "MAE model"),
])
def test_bad_use_fm_is_a_one_line_error(argv, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(argv)
    assert "\n" not in str(e.value)
    load_config(["--model", "mae_vit_base_patch16", "--use_fm", "-1"])  # the official default, pasted: harmless


def test_use_fm_in_a_recipe_is_type_checked(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: crossmae_vit_base_patch16\nuse_fm: all\n")
    with pytest.raises(ConfigError, match="use_fm must be a list of ints"):
        load_config(["--config", str(recipe)])
    recipe.write_text("model: crossmae_vit_base_patch16\nuse_fm: [-1]\nmodel_kwargs: {use_fm: [3]}\n")
    with pytest.raises(ConfigError, match="given twice"):
        load_config(["--config", str(recipe)])


def test_lr_rule():
    cfg = {**DEFAULTS, "model": "crossmae_vit_base_patch16", "batch_size": 512, "accum_iter": 2, "blr": 1.5e-4,
           "mask_ratio": 0.75, "prediction_ratio": 0.25}
    base = 1.5e-4 * 512 * 2 * 4 / 256
    assert resolve_lr(cfg, world_size=4) == pytest.approx(base / 3)  # x prediction/mask, CrossMAE's default
    assert resolve_lr({**cfg, "lr_prediction_scale": "inverse"}, 4) == pytest.approx(base * 3)
    assert resolve_lr({**cfg, "lr_prediction_scale": "none"}, 4) == pytest.approx(base)
    assert resolve_lr({**cfg, "model": "mae_vit_base_patch16"}, 4) == pytest.approx(base)  # MAE: no factor
    assert resolve_lr({**cfg, "lr": 0.1}, 4) == 0.1


@pytest.mark.parametrize("recipe, message", [
    ({"norm_pix_loss": "no"}, "norm_pix_loss must be a bool, got 'no'"),
    ({"epochs": "ten"}, "epochs must be an int, got 'ten'"),
    ({"batch_size": 8.5}, "batch_size must be an int, got 8.5"),
    ({"blr": -1.0}, "--blr must be > 0"),
    ({"lr": -0.1}, "--lr must be > 0"),
    ({"input_size": 100}, "not a multiple of the patch size 16"),
    ({"device": "gpu"}, "--device 'gpu' is not a device"),
    ({"num_workers": -1}, "--num_workers must be >= 0"),
    ({"save_every": 0}, "--save_every must be >= 1"),
    ({"warmup_epochs": -1}, "--warmup_epochs must be >= 0"),
    ({"model": "mae_vit_gigantic"}, "unknown model 'mae_vit_gigantic'"),
])
def test_wrong_config_values_are_one_line_errors(recipe, message, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as e:
        load_config(["--config", str(path)])
    assert "\n" not in str(e.value)


def test_broken_yaml_is_one_line(tmp_path):
    (tmp_path / "r.yaml").write_text("epochs: [1, 2\n")
    with pytest.raises(ConfigError, match="is not valid YAML") as e:
        load_config(["--config", str(tmp_path / "r.yaml")])
    assert "\n" not in str(e.value)
