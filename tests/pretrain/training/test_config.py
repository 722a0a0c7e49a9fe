"""Pretraining configuration (`pretrain.training.config`): flags over recipes over defaults, recipe bases, value
checks as one-line errors, the shipped recipes against the papers' and the released runs' settings, `--use_fm`, and
the learning-rate rule."""
from pathlib import Path
from typing import NamedTuple

import pytest
import yaml

from pretrain import cli as pretrain_cli
from pretrain.errors import ConfigError
from pretrain.models import create_model
from pretrain.training.config import DEFAULTS, load_config, load_recipe, resolve_lr

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


class Recipe(NamedTuple):
    model: str | None  # None: a base that names no model (the per-model recipes merge over it)
    processes: int  # the number of processes (GPUs) the recipe is meant for
    batch: int  # effective batch: batch_size x accum_iter x processes
    lr: float  # absolute lr, resolve_lr: blr x batch / 256, for CrossMAE x prediction / mask ("proportional")
    epochs: int
    warmup: int
    mask: float
    prediction: float | None  # CrossMAE's prediction (official: kept mask) ratio
    lr_rule: str | None  # CrossMAE's lr_prediction_scale
    size: int = 224


# blr 1.5e-4 x 4096 / 256 = 2.4e-3; CrossMAE's "proportional" rule (its trainer's default, main_pretrain.py:
# lr = kept_mask_ratio / mask_ratio x blr x eff_batch / 256) leaves it at prediction 0.75 and gives 2.4e-3 / 3 = 8e-4
# at prediction 0.25. Every ImageNet recipe: weight decay 0.05, normalised-pixel loss (checked below).
RECIPES = {
    # facebookresearch/mae PRETRAIN.md and the MAE paper: blr 1.5e-4, effective batch 4096 (64 per GPU x 64 GPUs;
    # here 512 x 8, imagenet_800ep.yaml's comment), 800 epochs, 40 warm-up, mask 0.75, weight decay 0.05. The base
    # names no model; its lr is resolved with DEFAULTS' model (a CrossMAE at prediction = mask: no factor).
    "imagenet_800ep.yaml": Recipe(None, 8, 4096, 2.4e-3, 800, 40, 0.75, None, None),
    "mae_vit_base_800ep.yaml": Recipe("mae_vit_base_patch16", 8, 4096, 2.4e-3, 800, 40, 0.75, None, None),
    "mae_vit_large_800ep.yaml": Recipe("mae_vit_large_patch16", 8, 4096, 2.4e-3, 800, 40, 0.75, None, None),
    "mae_vit_huge_800ep.yaml": Recipe("mae_vit_huge_patch14", 8, 4096, 2.4e-3, 800, 40, 0.75, None, None),
    # MAE released no ViT-S: the MAE recipe on ViT-S, the CrossMAE paper's MAE baseline
    "mae_vit_small_800ep.yaml": Recipe("mae_vit_small_patch16", 8, 4096, 2.4e-3, 800, 40, 0.75, None, None),
    # the CrossMAE paper's 400-epoch ablation schedule (20 warm-up epochs), for both methods
    "mae_vit_small_400ep.yaml": Recipe("mae_vit_small_patch16", 8, 4096, 2.4e-3, 400, 20, 0.75, None, None),
    "mae_vit_base_400ep.yaml": Recipe("mae_vit_base_patch16", 8, 4096, 2.4e-3, 400, 20, 0.75, None, None),
    "crossmae_vit_small_400ep.yaml": Recipe("crossmae_vit_small_patch16", 8, 4096, 2.4e-3, 400, 20, 0.75, 0.75,
                                            "proportional"),
    "crossmae_vit_base_400ep.yaml": Recipe("crossmae_vit_base_patch16", 8, 4096, 2.4e-3, 400, 20, 0.75, 0.75,
                                           "proportional"),
    # TonyLianLong/CrossMAE README: the released ViT-S/B/L are trained 800 epochs at mask and kept mask ratio 0.75,
    # ViT-H at mask 0.75 and kept mask 0.25 (vith-mr0.75-kmr0.25-dd12); its pretraining commands: blr 1.5e-4,
    # weight decay 0.05, 40 warm-up epochs, effective batch 4096 (1024 x 4 GPUs; ViT-S 512 x accum 8 x 1 GPU)
    "crossmae_vit_small_800ep.yaml": Recipe("crossmae_vit_small_patch16", 8, 4096, 2.4e-3, 800, 40, 0.75, 0.75,
                                            "proportional"),
    "crossmae_vit_base_800ep.yaml": Recipe("crossmae_vit_base_patch16", 8, 4096, 2.4e-3, 800, 40, 0.75, 0.75,
                                           "proportional"),
    "crossmae_vit_large_800ep.yaml": Recipe("crossmae_vit_large_patch16", 8, 4096, 2.4e-3, 800, 40, 0.75, 0.75,
                                            "proportional"),
    "crossmae_vit_huge_800ep.yaml": Recipe("crossmae_vit_huge_patch14", 8, 4096, 8e-4, 800, 40, 0.75, 0.25,
                                           "proportional"),
    # the README's ViT-B pretraining command: --kept_mask_ratio 0.25 at the trainer's default lr rule (the paper's
    # efficient setting)
    "crossmae_vit_base_pr0.25_800ep.yaml": Recipe("crossmae_vit_base_patch16", 8, 4096, 8e-4, 800, 40, 0.75, 0.25,
                                                  "proportional"),
    # the README: the 448 px ViT-B is trained 400 epochs, mask and kept mask 0.75; it names no warm-up, so the
    # recipe keeps the commands' 40 (its own comment says so)
    "crossmae_vit_base_448_400ep.yaml": Recipe("crossmae_vit_base_patch16", 8, 4096, 2.4e-3, 400, 40, 0.75, 0.75,
                                               "proportional", size=448),
    # this project's CPU runs on the built-in images (no paper run): one process, 32 images, blr 1.5e-3 (the
    # recipe's comment: lr = 1.5e-3 x 32 / 256 = 1.9e-4), 8 epochs with 1 warm-up, 96 px
    "mae_vit_tiny_cpu.yaml": Recipe("mae_vit_tiny_patch16", 1, 32, 1.875e-4, 8, 1, 0.75, None, None, size=96),
    "crossmae_vit_tiny_cpu.yaml": Recipe("crossmae_vit_tiny_patch16", 1, 32, 1.875e-4, 8, 1, 0.75, 0.75,
                                         "proportional", size=96),
}
SHIPPED = sorted(p.name for p in (ROOT / "configs" / "pretrain").glob("*.yaml"))


@pytest.mark.parametrize("name", sorted(set(SHIPPED) | set(RECIPES)))
def test_shipped_recipes_load(name):
    # each shipped recipe, resolved as the trainer resolves it, against the row of its source; a new recipe needs
    # its row, a row its recipe
    assert name in SHIPPED and name in RECIPES, name
    path, want = ROOT / "configs" / "pretrain" / name, RECIPES[name]
    cfg = load_config(["--config", str(path), "--data_path", "builtin"])
    assert cfg["model"].split("_")[0] in ("mae", "crossmae"), name
    assert cfg["model"] == (want.model or DEFAULTS["model"]) and ("model" in load_recipe(path)) == bool(want.model)
    assert cfg["batch_size"] * cfg["accum_iter"] * want.processes == want.batch
    assert resolve_lr(cfg, world_size=want.processes) == pytest.approx(want.lr, rel=1e-12)
    assert (cfg["epochs"], cfg["warmup_epochs"], cfg["mask_ratio"], cfg["input_size"]) == (
        want.epochs, want.warmup, want.mask, want.size)
    assert cfg["weight_decay"] == 0.05 and cfg["norm_pix_loss"] is True and cfg["min_lr"] == 0.0
    if cfg["model"].startswith("crossmae") and want.model:
        assert (cfg["prediction_ratio"], cfg["lr_prediction_scale"]) == (want.prediction, want.lr_rule)
    else:
        assert want.prediction is None and want.lr_rule is None


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


@pytest.mark.parametrize("argv", [["--lr", "inf"], ["--blr", "nan"], ["--weight_decay", "nan"], ["--min_lr", "nan"],
                                  ["--loss_spike_factor", "nan"], ["--warmup_epochs", "inf"], ["--mask_ratio", "nan"],
                                  ["--loss_spike_factor", "-1"], ["--weight_decay", "inf"]])
def test_non_finite_and_negative_numbers_are_refused_as_inputs(argv, capsys, one_error_line):
    flag, value = argv
    with pytest.raises(ConfigError, match=f"{flag} must be") as e:
        load_config(argv)
    assert "\n" not in str(e.value)
    assert pretrain_cli.pretrain([*argv, "--output_dir", "/nonexistent/never-made"]) == 2
    one_error_line(f"{flag} must be", value if value != "-1" else ">= 0")


def test_a_non_finite_number_in_a_recipe_is_refused(tmp_path):
    (tmp_path / "r.yaml").write_text("lr: .inf\n")
    with pytest.raises(ConfigError, match="--lr must be a finite number, got inf"):
        load_config(["--config", str(tmp_path / "r.yaml")])


def test_help_names_the_run_folder_the_step0_snapshot_and_the_fair_comparison(capsys):
    with pytest.raises(SystemExit):
        load_config(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for words in ("config.yaml", "checkpoint-last.pth", "log.txt", "tensorboard/", "recon/",
                  "snapshots/step-0000000.pth",
                  "the same --seed alone", "docs/pretraining.md#fair-comparison"):
        assert words in text, words
    assert "\n## Fair comparison\n" in (ROOT / "docs" / "pretraining.md").read_text()
