"""The pretraining trainer: config, schedule, checkpoints, resume, data errors, NaN guard, DDP."""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pretrain import files as files_mod
from pretrain.models import create_model
from pretrain.training.config import DEFAULTS, load_config, resolve_lr
from pretrain.data.images import build_dataset, render_builtin_image
from pretrain.training.engine import optimizer_steps_per_epoch, train_one_epoch
from pretrain.training.schedule import lr_at
from pretrain.errors import CheckpointError, ConfigError, DataError
from pretrain.training import trainer
from pretrain.training.trainer import TrainingDiverged, run

ROOT = Path(__file__).resolve().parents[1]
TINY = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "decoder_embed_dim": 32,
        "decoder_num_heads": 2}


def tiny_cfg(tmp_path: Path, model: str = "crossmae_vit_tiny_patch16", **kw) -> dict:
    cfg = dict(DEFAULTS)
    cfg.update(model=model, model_kwargs=TINY, decoder_depth=2, input_size=32, batch_size=4, epochs=2,
               warmup_epochs=1, blr=1e-2, builtin_size=16, num_workers=0, output_dir=str(tmp_path / "run"),
               device="cpu", vis_every=1, save_every=1, seed=3)
    cfg.update(kw)
    return cfg


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


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


class _Scalar(torch.nn.Module):
    """loss = w * x for a scalar batch x: each iteration's gradient is its own x."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, imgs: torch.Tensor):
        return SimpleNamespace(loss=self.w * imgs.sum())


@pytest.mark.parametrize("step_partial, expected_steps, expected_w", [
    (False, 2, -((1 + 2) / 2 + (3 + 4) / 2)),  # official: iteration 5 (a group of 1) never reaches the weights
    (True, 3, -((1 + 2) / 2 + (3 + 4) / 2 + 5 / 2)),  # stepped on, its loss still divided by accum_iter
])
def test_last_partial_accumulation_group(step_partial, expected_steps, expected_w):
    model = _Scalar()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    steps = []
    optimizer.register_step_post_hook(lambda *_: steps.append(model.w.item()))
    loader = [(torch.tensor([float(x)]), torch.tensor([0])) for x in (1, 2, 3, 4, 5)]
    cfg = {"accum_iter": 2, "warmup_epochs": 0, "epochs": 1, "min_lr": 1.0, "log_every": 1}
    if step_partial:
        cfg["step_partial_accum"] = True
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    stats = train_one_epoch(model, loader, optimizer, scaler, torch.device("cpu"), 0, cfg, peak_lr=1.0)
    assert len(steps) == expected_steps == optimizer_steps_per_epoch(5, 2, step_partial)
    assert model.w.item() == pytest.approx(expected_w)
    assert model.w.grad is None  # nothing left over for the next epoch
    # the dropped group's loss is still logged: w is 0, 0, -1.5, -1.5, -5 when the five losses are computed
    assert stats["loss"] == pytest.approx((0 + 0 - 1.5 * 3 - 1.5 * 4 - 5 * 5) / 5)
    assert optimizer_steps_per_epoch(4, 2, step_partial) == 2


def test_default_is_the_official_accumulation_and_refuses_an_epoch_without_steps(tmp_path):
    assert load_config([])["step_partial_accum"] is False
    assert load_config(["--step_partial_accum"])["step_partial_accum"] is True
    with pytest.raises(ConfigError, match="optimizer would never step"):  # 16 images / batch 4 = 4 iterations
        run(tiny_cfg(tmp_path, accum_iter=8, epochs=1))


def test_lr_rule():
    cfg = {**DEFAULTS, "model": "crossmae_vit_base_patch16", "batch_size": 512, "accum_iter": 2, "blr": 1.5e-4,
           "mask_ratio": 0.75, "prediction_ratio": 0.25}
    base = 1.5e-4 * 512 * 2 * 4 / 256
    assert resolve_lr(cfg, world_size=4) == pytest.approx(base / 3)  # x prediction/mask, CrossMAE's default
    assert resolve_lr({**cfg, "lr_prediction_scale": "inverse"}, 4) == pytest.approx(base * 3)
    assert resolve_lr({**cfg, "lr_prediction_scale": "none"}, 4) == pytest.approx(base)
    assert resolve_lr({**cfg, "model": "mae_vit_base_patch16"}, 4) == pytest.approx(base)  # MAE: no factor
    assert resolve_lr({**cfg, "lr": 0.1}, 4) == 0.1


def test_lr_schedule_warmup_then_cosine():
    cfg = {"warmup_epochs": 10, "epochs": 110, "min_lr": 1e-6}
    assert lr_at(0, cfg, 1.0) == 0.0
    assert lr_at(5, cfg, 1.0) == pytest.approx(0.5)
    assert lr_at(10, cfg, 1.0) == pytest.approx(1.0)
    assert lr_at(60, cfg, 1.0) == pytest.approx((1.0 + 1e-6) / 2)
    assert lr_at(110, cfg, 1.0) == pytest.approx(1e-6)


def test_builtin_images_are_deterministic():
    a, b = render_builtin_image(7, 64, seed=1), render_builtin_image(7, 64, seed=1)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, render_builtin_image(8, 64, seed=1))
    assert a.std() > 10  # not a flat image


def test_data_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_dataset(str(tmp_path / "missing"), 32)
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match="train/<class>/<image>"):
        build_dataset(str(tmp_path / "flat"), 32)
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="no images under"):
        build_dataset(str(tmp_path / "empty"), 32)


def test_unreadable_images_are_replaced_and_counted(tmp_path):
    cls = tmp_path / "data" / "train" / "n01"
    cls.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(render_builtin_image(i, 48)).save(cls / f"ok{i}.png")
    (cls / "bad0.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")  # sorts first
    ds = build_dataset(str(tmp_path / "data"), 32)
    counts = [ds[i][1] for i in range(len(ds))]
    assert ds[0][0].shape == (3, 32, 32)
    assert sum(counts) == 1  # only the sample whose file is corrupt needed a replacement


def test_checkpoint_round_trip_weights_only(tmp_path):
    cfg = tiny_cfg(tmp_path, epochs=1)
    run(cfg)
    out = Path(cfg["output_dir"])
    ckpt = torch.load(out / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    assert set(ckpt) == {"model", "optimizer", "scaler", "epoch", "config"}
    assert ckpt["epoch"] == 0 and ckpt["config"]["model"] == cfg["model"]
    assert (out / "checkpoint-0.pth").is_file() and (out / "recon" / "epoch_0000.png").is_file()
    model = create_model(cfg)
    model.load_state_dict(ckpt["model"], strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt["model"][k]), k
    assert yaml.safe_load((out / "config.yaml").read_text())["lr_resolved"] == pytest.approx(1e-2 * 4 / 256 * 1.0)


def test_atomic_save_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "ck.pth"
    files_mod.save_atomic({"a": torch.ones(2)}, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(files_mod.torch, "save", broken_save)
    with pytest.raises(OSError):
        files_mod.save_atomic({"a": torch.zeros(2)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pth"]  # no temp file left behind


@pytest.mark.parametrize("model", ["crossmae_vit_tiny_patch16", "mae_vit_tiny_patch16"])
def test_resume_logs_same_losses(tmp_path, model):
    full = tiny_cfg(tmp_path / "a", model=model, epochs=3)
    run(full)
    part = tiny_cfg(tmp_path / "b", model=model, epochs=1)
    run(part)
    run({**part, "epochs": 3, "resume": "auto"})
    a, b = read_log(Path(full["output_dir"])), read_log(Path(part["output_dir"]))
    assert [r["epoch"] for r in b] == [0, 1, 2]
    np.testing.assert_allclose([r["train_loss"] for r in b], [r["train_loss"] for r in a], rtol=1e-6)
    assert a[0]["train_loss"] != a[2]["train_loss"]  # the comparison is not between constants


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path, epochs=1)
    run(cfg)
    good = torch.load(Path(cfg["output_dir"]) / "checkpoint-last.pth", weights_only=True)
    real = trainer.create_model

    def nan_model(c):
        m = real(c)
        m.register_forward_hook(lambda mod, inputs, out: out._replace(loss=out.loss * float("nan")))
        return m

    monkeypatch.setattr(trainer, "create_model", nan_model)
    with pytest.raises(TrainingDiverged, match="loss is nan at epoch 1.*kept checkpoint .* is from epoch 0"):
        run({**cfg, "epochs": 2, "resume": "auto"})
    after = torch.load(Path(cfg["output_dir"]) / "checkpoint-last.pth", weights_only=True)
    assert after["epoch"] == good["epoch"] == 0


def test_two_process_gloo_ddp(tmp_path):
    out = tmp_path / "ddp"
    recipe = tmp_path / "tiny.yaml"
    cfg = tiny_cfg(tmp_path, epochs=1, output_dir=str(out), batch_size=2)
    recipe.write_text(yaml.safe_dump({k: cfg[k] for k in ("model", "model_kwargs", "decoder_depth", "input_size",
                                                           "batch_size", "epochs", "warmup_epochs", "builtin_size",
                                                           "num_workers", "output_dir", "device", "seed")}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29517", str(ROOT / "tools" / "main_pretrain.py"), "--config", str(recipe)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["world_size"] == 2 and resolved["effective_batch_size"] == 4
    log = read_log(out)
    assert len(log) == 1 and np.isfinite(log[0]["train_loss"])
    ckpt = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert not any(k.startswith("module.") for k in ckpt["model"])  # saved unwrapped, loadable without DDP


def test_a_folder_of_images_trains_and_caching_changes_no_loss(tmp_path):
    # a flat folder (e.g. the detection set's train split) is a dataset; decoding once gives the same batches
    folder = tmp_path / "imgs" / "split"
    folder.mkdir(parents=True)
    for i in range(16):
        Image.fromarray(render_builtin_image(i, 40)).save(folder / f"{i:03d}.jpg")
    runs = {}
    for cache in (False, True):
        cfg = tiny_cfg(tmp_path / str(cache), data_path=str(tmp_path / "imgs"), cache_images=cache, epochs=1)
        run(cfg)
        runs[cache] = read_log(Path(cfg["output_dir"]))[0]["train_loss"]
    assert runs[True] == runs[False]
    ds = build_dataset(str(tmp_path / "imgs"), 32, cache_images=True)
    assert len(ds) == 16 and ds.pixels is not None and ds[3][0].shape == (3, 32, 32)


def test_snapshots_hold_the_step_zero_weights_and_later_ones(tmp_path):
    cfg = tiny_cfg(tmp_path, epochs=3, snapshot_every=2)
    run(cfg)
    snaps = sorted((Path(cfg["output_dir"]) / "snapshots").glob("step-*.pth"))
    per_epoch = 16 // 4
    assert [p.name for p in snaps] == [f"step-{s:07d}.pth" for s in (0, 2 * per_epoch, 3 * per_epoch)]
    first = torch.load(snaps[0], weights_only=True)
    assert set(first) == {"model", "step", "epoch", "config"} and first["step"] == 0
    torch.manual_seed(0)
    from pretrain.training.trainer import seed_epoch

    seed_epoch(cfg["seed"], -1, 0)
    fresh = create_model(cfg).state_dict()
    assert all(torch.equal(fresh[k], v) for k, v in first["model"].items())  # step 0 is the untrained model
    last = torch.load(snaps[-1], weights_only=True)["model"]
    final = torch.load(Path(cfg["output_dir"]) / "checkpoint-last.pth", weights_only=True)["model"]
    assert all(torch.equal(final[k], v) for k, v in last.items())


def test_init_from_starts_another_method_from_the_same_encoder(tmp_path):
    mae = tiny_cfg(tmp_path / "mae", model="mae_vit_tiny_patch16", epochs=1, snapshot_every=1)
    run(mae)
    step0 = Path(mae["output_dir"]) / "snapshots" / "step-0000000.pth"
    cross = tiny_cfg(tmp_path / "cross", epochs=1, snapshot_every=1, init_from=str(step0))
    run(cross)
    a = torch.load(step0, weights_only=True)["model"]
    b = torch.load(Path(cross["output_dir"]) / "snapshots" / "step-0000000.pth", weights_only=True)["model"]
    encoder = [k for k in b if k.startswith(("blocks.", "patch_embed.", "cls_token", "pos_embed"))]
    assert encoder and all(torch.equal(a[k], b[k]) for k in encoder)
    assert not torch.equal(a["mask_token"], b["mask_token"]) or a["mask_token"].shape != b["mask_token"].shape
    bad = tiny_cfg(tmp_path / "bad", epochs=1, init_from=str(step0), model_kwargs={**TINY, "depth": 3})
    with pytest.raises(CheckpointError, match="lacks encoder tensors"):
        run(bad)
