"""Reliability and security: no code runs from a weights file, no silent overwrite or loss, one-line errors.

Every case here failed (ran the payload, lost data, or printed a traceback) before the fix it guards.
"""
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import detection  # noqa: F401  (compat layer before detectron2)
from detection import cli as detection_cli
from detection.datasets import clean_annotations, load_checked_coco_json, write_builtin_shapes
from pretrain import files as files_mod
from pretrain import cli as pretrain_cli
from pretrain.models import create_model
from pretrain.training.config import DEFAULTS, load_config
from pretrain.data.images import open_rgb, render_builtin_image
from pretrain.errors import ConfigError, DataError
from pretrain.training import trainer
from pretrain.training.trainer import run
from workflows import cli as workflows_cli

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs/demo/mask_rcnn_vit_smoke_builtin.py")
TINY = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "decoder_embed_dim": 32,
        "decoder_num_heads": 2}


class Payload:
    """Unpickling this runs a shell command that creates MARKER: what a hostile checkpoint does."""

    marker = ""

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _hostile(tmp_path: Path, suffix: str) -> tuple[Path, Path]:
    marker = tmp_path / "PWNED"
    Payload.marker = str(marker)
    path = tmp_path / f"evil{suffix}"
    if suffix == ".pkl":
        with open(path, "wb") as f:
            pickle.dump({"model": {"w": Payload()}, "__author__": "x"}, f)
    else:
        torch.save({"model": {"blocks.0.w": Payload()}, "epoch": 0}, path)
    return path, marker


def _tiny_cfg(tmp_path: Path, **kw) -> dict:
    cfg = dict(DEFAULTS)
    cfg.update(model="crossmae_vit_tiny_patch16", model_kwargs=TINY, decoder_depth=2, input_size=32, batch_size=4,
               epochs=2, warmup_epochs=1, blr=1e-2, builtin_size=16, num_workers=0, output_dir=str(tmp_path / "run"),
               device="cpu", vis_every=1, save_every=1, seed=3)
    cfg.update(kw)
    return cfg


def _one_error_line(capsys, *needles: str) -> str:
    """The one `error:` line on stderr (progress logs may precede it), with no traceback anywhere."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ") or ": error: " in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------------------------------ no code from files

def _tools(path: Path, tmp_path: Path) -> dict:
    out = tmp_path / "out"
    return {
        "convert": lambda: detection_cli.convert([str(path), str(out / "d2.pth"), "--embed-dim", "32", "--depth", "2",
                                                  "--patch-size", "8"]),
        "visualize": lambda: pretrain_cli.visualize([str(path), "--builtin", "1", "--output", str(out)]),
        "analyze_attention": lambda: pretrain_cli.analyze_attention([str(path), "--builtin", "1", "--output", str(out)]),
        "export_encoder": lambda: pretrain_cli.export_encoder([str(path), str(out / "enc.pth")]),
        "probe": lambda: workflows_cli.probe([str(path), "--device", "cpu"]),
        "pretrain --resume": lambda: pretrain_cli.pretrain(["--resume", str(path), "--output_dir", str(out / "p"),
                                                           "--device", "cpu"]),
        "pretrain --init_from": lambda: pretrain_cli.pretrain(["--init_from", str(path), "--output_dir",
                                                               str(out / "q"), "--device", "cpu"]),
        "train_net init": lambda: detection_cli.train_net(["--config-file", SMOKE, f"train.init_checkpoint={path}",
                                                           f"train.output_dir={out / 'd'}"]),
        "train_net eval": lambda: detection_cli.train_net(["--config-file", SMOKE, "--eval-only",
                                                           f"train.init_checkpoint={path}",
                                                           f"train.output_dir={out / 'e'}"]),
    }


@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
@pytest.mark.parametrize("tool", ["convert", "visualize", "analyze_attention", "export_encoder", "probe",
                                  "pretrain --resume", "pretrain --init_from", "train_net init", "train_net eval"])
def test_no_tool_runs_code_from_a_weights_file(tool, suffix, tmp_path, capsys):
    path, marker = _hostile(tmp_path, suffix)
    assert _tools(path, tmp_path)[tool]() == 2
    assert not marker.exists(), f"{tool} ran the payload of {path.name}"
    _one_error_line(capsys, "--trust-pickle")


def test_train_net_loads_a_pickle_only_when_trusted(tmp_path, capsys):
    # a benign model-zoo-style .pkl (numpy weights, as detectron2's zoo stores them): refused, then read on opt-in
    path = tmp_path / "zoo.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"roi_heads.box_predictor.cls_score.bias": np.zeros(5, np.float32)},
                     "__author__": "zoo"}, f)
    overrides = [f"train.init_checkpoint={path}", f"train.output_dir={tmp_path / 'o'}", "train.max_iter=1"]
    assert detection_cli.train_net(["--config-file", SMOKE, "--allow-partial-init", *overrides]) == 2
    _one_error_line(capsys, "is a pickle", "--trust-pickle")
    assert detection_cli.train_net(["--config-file", SMOKE, "--allow-partial-init", "--trust-pickle", *overrides]) == 0


def test_corrupt_bytes_are_not_blamed_on_pickles(tmp_path, capsys):
    good = tmp_path / "good.pth"
    torch.save({"model": {"a": torch.ones(2)}}, good)
    (tmp_path / "trunc.pth").write_bytes(good.read_bytes()[:40])
    (tmp_path / "text.pth").write_text("hello\n")
    (tmp_path / "empty.pth").write_bytes(b"")
    for name, needle in (("trunc.pth", "corrupt"), ("text.pth", "corrupt"), ("empty.pth", "empty (0 bytes)")):
        assert detection_cli.convert([str(tmp_path / name), str(tmp_path / "o.pth"), "--embed-dim", "2", "--depth",
                                      "1", "--patch-size", "8"]) == 2
        line = _one_error_line(capsys, needle)
        assert "--trust-pickle" not in line


# ------------------------------------------------------------------------------------------ no silent overwrite or loss

def test_a_used_output_folder_is_refused_unless_resumed_or_overwritten(tmp_path, capsys):
    cfg = _tiny_cfg(tmp_path, epochs=1)
    run(cfg)
    before = (Path(cfg["output_dir"]) / "checkpoint-last.pth").read_bytes()
    flags = ["--model", cfg["model"], "--output_dir", cfg["output_dir"], "--device", "cpu"]
    capsys.readouterr()
    assert pretrain_cli.pretrain(flags) == 2
    _one_error_line(capsys, "holds an earlier run", "--resume auto", "--overwrite")
    assert (Path(cfg["output_dir"]) / "checkpoint-last.pth").read_bytes() == before
    run({**cfg, "overwrite": True, "seed": 4})
    log = (Path(cfg["output_dir"]) / "log.txt").read_text().splitlines()
    assert len(log) == 1  # the earlier run's lines are gone, not mixed in


def test_train_net_refuses_an_output_folder_holding_a_run(tmp_path, capsys):
    out = tmp_path / "det"
    out.mkdir()
    (out / "metrics.json").write_text("{}\n")
    assert detection_cli.train_net(["--config-file", SMOKE, f"train.output_dir={out}"]) == 2
    _one_error_line(capsys, "holds an earlier run", "--resume", "--overwrite")


def test_a_kill_before_the_epoch_is_marked_done_loses_nothing(tmp_path, monkeypatch):
    full = _tiny_cfg(tmp_path / "a", epochs=3, save_every=1, snapshot_every=1)
    run(full)
    part = _tiny_cfg(tmp_path / "b", epochs=3, save_every=1, snapshot_every=1)
    real = files_mod.save_atomic

    def killed_at_epoch_1_last(obj, path):
        if Path(path).name == "checkpoint-last.pth" and obj["epoch"] == 1:
            raise KeyboardInterrupt  # as a kill right after the numbered checkpoint, snapshot and log line
        real(obj, path)

    monkeypatch.setattr(trainer, "save_atomic", killed_at_epoch_1_last)
    with pytest.raises(KeyboardInterrupt):
        run(part)
    monkeypatch.undo()
    run({**part, "resume": "auto"})
    out_a, out_b = Path(full["output_dir"]), Path(part["output_dir"])
    logs = [[json.loads(line) for line in (o / "log.txt").read_text().splitlines()] for o in (out_a, out_b)]
    assert [r["epoch"] for r in logs[1]] == [0, 1, 2]  # epoch 1 redone, logged once
    np.testing.assert_allclose([r["train_loss"] for r in logs[1]], [r["train_loss"] for r in logs[0]], rtol=1e-6)
    assert sorted(p.name for p in out_b.glob("checkpoint-*.pth")) == sorted(p.name for p in out_a.glob("checkpoint-*.pth"))


def test_a_loss_spike_stops_before_the_diverged_epoch_is_saved(tmp_path, monkeypatch):
    cfg = _tiny_cfg(tmp_path, epochs=3, builtin_size=96, loss_spike_factor=10.0)
    real = trainer.create_model
    calls = {"n": 0}

    def blowing_up(c):
        m = real(c)

        def hook(mod, inputs, out):
            calls["n"] += 1
            return out._replace(loss=out.loss * 4.8e7) if calls["n"] > 30 else out  # epoch 1 (24 per epoch)
        m.register_forward_hook(hook)
        return m

    monkeypatch.setattr(trainer, "create_model", blowing_up)
    with pytest.raises(trainer.TrainingDiverged, match=r"median.*epoch 1.*kept checkpoint .*checkpoint-last.pth is "
                                                      r"from epoch 0"):
        run(cfg)
    ckpt = torch.load(Path(cfg["output_dir"]) / "checkpoint-last.pth", weights_only=True)
    assert ckpt["epoch"] == 0 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_resume_past_the_last_epoch_says_the_run_is_complete(tmp_path, caplog):
    cfg = _tiny_cfg(tmp_path, epochs=1)
    run(cfg)
    result = run({**cfg, "resume": "auto"})
    assert result["complete"] and "already complete" in caplog.text and "raise --epochs" in caplog.text


def test_leftover_temporary_files_are_cleaned_and_the_converter_writes_atomically(tmp_path, monkeypatch, capsys):
    cfg = _tiny_cfg(tmp_path, epochs=1)
    out = Path(cfg["output_dir"])
    out.mkdir(parents=True)
    (out / ".checkpoint-last.pth.abc123.tmp").write_bytes(b"half")
    run(cfg)
    assert not list(out.glob(".*.tmp"))
    src = tmp_path / "src.pth"
    torch.save({"model": create_model({**cfg}).state_dict()}, src)

    def dies(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(files_mod.torch, "save", dies)
    dst = tmp_path / "d2.pth"
    assert detection_cli.convert([str(src), str(dst), "--embed-dim", "32", "--depth", "2", "--patch-size", "8"]) == 130
    assert not dst.exists() and not list(tmp_path.glob(".d2.pth.*"))  # a retry is not blocked by a 0-byte file


def test_ctrl_c_keeps_the_checkpoint_says_where_and_exits_130(tmp_path, monkeypatch, capsys):
    real = trainer.train_one_epoch

    def interrupted(*args, **kwargs):
        if args[5] == 1:  # epoch
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_one_epoch", interrupted)
    out = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({k: v for k, v in _tiny_cfg(tmp_path).items() if k in
                                      ("model", "model_kwargs", "decoder_depth", "input_size", "batch_size", "epochs",
                                       "warmup_epochs", "builtin_size", "num_workers", "device")}))
    assert pretrain_cli.pretrain(["--config", str(recipe), "--output_dir", str(out)]) == 130
    _one_error_line(capsys, "interrupted in epoch 1", "is from epoch 0", "--resume auto")
    assert torch.load(out / "checkpoint-last.pth", weights_only=True)["epoch"] == 0


# ------------------------------------------------------------------------------------------ silent wrong results

def test_an_override_key_that_does_not_exist_is_an_error(capsys):
    assert detection_cli.train_net(["--config-file", SMOKE, "train.max_itr=5"]) == 2
    _one_error_line(capsys, "train has no key 'max_itr'", "did you mean train.max_iter")
    assert detection_cli.train_net(["--config-file", SMOKE, "model.backbone.net.no_such_arg=1"]) == 2
    _one_error_line(capsys, "no key 'no_such_arg'")


@pytest.mark.parametrize("kind", ["unconverted", "wrong_size"])
def test_an_init_checkpoint_that_leaves_the_backbone_unset_fails(kind, tmp_path, capsys):
    path = tmp_path / f"{kind}.pth"
    if kind == "unconverted":  # a pretraining checkpoint is converted on the fly, but this one is wider than the ViT
        torch.save({"model": create_model(_tiny_cfg(tmp_path, model_kwargs={**TINY, "embed_dim": 48})).state_dict()},
                   path)
        needles = ("embed_dim=48", "does not match the target config")
    else:  # converted, but from a wider ViT than the config's
        torch.save({"model": {"backbone.net.patch_embed.proj.weight": torch.zeros(64, 3, 16, 16)}}, path)
        needles = ("leaves", "backbone weights unset", "--allow-partial-init")
    args = ["--config-file", SMOKE, f"train.init_checkpoint={path}", f"train.output_dir={tmp_path / 'o'}"]
    assert detection_cli.train_net(args) == 2
    _one_error_line(capsys, *needles)


def _write_coco(tmp_path: Path, annotations: list[dict], size=(64, 64)) -> tuple[Path, Path]:
    Image.fromarray(render_builtin_image(0, 64)).save(tmp_path / "a.jpg")
    coco = {"images": [{"id": 1, "file_name": "a.jpg", "height": size[0], "width": size[1]}],
            "annotations": [{"id": i + 1, "image_id": 1, "iscrowd": 0, "area": 1.0, **a}
                            for i, a in enumerate(annotations)],
            "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "a.json").write_text(json.dumps(coco))
    return tmp_path / "a.json", tmp_path


def test_bad_boxes_and_polygons_are_dropped_or_clipped_with_one_warning(tmp_path, caplog):
    square = [10, 10, 30, 10, 30, 30, 10, 30]
    anns = [{"category_id": 1, "bbox": [10, 10, 20, 20], "segmentation": [square]},  # fine
            {"category_id": 1, "bbox": [10, 10, -5, 20], "segmentation": [square]},  # negative width
            {"category_id": 1, "bbox": [100, 100, 10, 10], "segmentation": [square]},  # outside the image
            {"category_id": 1, "bbox": [50, 50, 30, 30], "segmentation": [[50, 50, 63, 50, 63, 63, 50, 63]]},  # clipped
            {"category_id": 1, "bbox": [5, 5, 10, 10], "segmentation": [[5, 5, 15, 5, 25, 5]]},  # zero-area polygon
            {"category_id": 1, "bbox": [5, 5, 10, 10], "segmentation": []}]  # empty: crashed training before
    json_file, root = _write_coco(tmp_path, anns)
    with caplog.at_level("WARNING"):
        records = load_checked_coco_json(json_file, root, "test_bad_boxes")
    kept = records[0]["annotations"]
    assert len(kept) == 2 and kept[1]["bbox"] == [50, 50, 14, 14]
    warnings = [r.message for r in caplog.records if "test_bad_boxes" in r.getMessage()]
    assert len(warnings) == 1
    text = caplog.records[-1].getMessage()
    assert "dropped 4 annotations" in text and "1 of non-positive size" in text and "1 outside the image" in text \
        and "2 with no usable mask polygon" in text and "clipped 1 boxes" in text
    assert clean_annotations([{"width": 64, "height": 64, "annotations": []}], "empty") == [
        {"width": 64, "height": 64, "annotations": []}]


@pytest.mark.parametrize("case, message", [
    ("unknown_category", "has category id 7"),
    ("broken_json", "is not valid JSON"),
])
def test_bad_annotation_files_are_one_line_errors(case, message, tmp_path):
    json_file, root = _write_coco(tmp_path, [{"category_id": 7 if case == "unknown_category" else 1,
                                              "bbox": [1, 1, 5, 5], "segmentation": [[1, 1, 6, 1, 6, 6]]}])
    if case == "broken_json":
        json_file.write_text(json_file.read_text()[:-10])
    with pytest.raises(DataError, match=message) as e:
        load_checked_coco_json(json_file, root, f"test_{case}")
    assert "\n" not in str(e.value)


def test_an_image_of_another_size_than_its_json_says_is_one_line(tmp_path, capsys):
    write_builtin_shapes(tmp_path / "s", num_train=2, num_val=1, image_size=64, seed=0)
    coco = json.loads((tmp_path / "s" / "annotations" / "train.json").read_text())
    coco["images"][0]["height"] = coco["images"][0]["width"] = 80
    (tmp_path / "s" / "annotations" / "train.json").write_text(json.dumps(coco))
    args = ["--config-file", SMOKE, "--dataset", "test_size_train", str(tmp_path / "s/annotations/train.json"),
            str(tmp_path / "s"), "dataloader.train.dataset.names=test_size_train", f"train.output_dir={tmp_path / 'o'}",
            "train.max_iter=4"]
    assert detection_cli.train_net(args) == 2
    _one_error_line(capsys, "Mismatched image shape", "check the width/height")


# ------------------------------------------------------------------------------------------ silent input changes

def test_a_16_bit_png_keeps_its_grey_levels(tmp_path):
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    img = np.asarray(open_rgb(tmp_path / "deep.png"))
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert abs(int(img[32, 0, 0]) - 128) <= 1 and img[0, 0, 0] == 0 and img[-1, -1, 0] == 255  # not all white
    assert np.all(np.diff(img[:, 0, 0].astype(int)) >= 0)
    Image.new("L", (8, 8), 77).save(tmp_path / "grey.png")
    Image.new("CMYK", (8, 8), (0, 0, 0, 0)).save(tmp_path / "cmyk.jpg")
    assert np.asarray(open_rgb(tmp_path / "grey.png"))[0, 0].tolist() == [77, 77, 77]
    assert open_rgb(tmp_path / "cmyk.jpg").mode == "RGB" and np.asarray(open_rgb(tmp_path / "cmyk.jpg")).min() > 240


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


@pytest.mark.parametrize("kind, message", [
    ("empty", "is empty (0 bytes)"),
    ("tensor", "holds a Tensor, not a checkpoint dict"),
    ("list", "holds a list, not a checkpoint dict"),
    ("released", "no resume checkpoint of this trainer"),
    ("other_size", "tensors of another shape"),
])
def test_unusable_resume_checkpoints_are_one_line(kind, message, tmp_path, capsys):
    path = tmp_path / "ck.pth"
    cfg = _tiny_cfg(tmp_path)
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "list":
        torch.save([torch.zeros(3)], path)
    elif kind == "released":
        torch.save({"model": create_model(cfg).state_dict()}, path)
    else:
        other = create_model({**cfg, "model_kwargs": {**TINY, "embed_dim": 48}})
        torch.save({"model": other.state_dict(), "optimizer": {}, "epoch": 0}, path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({k: cfg[k] for k in ("model", "model_kwargs", "decoder_depth", "input_size",
                                                          "batch_size", "builtin_size", "num_workers", "device")}))
    assert pretrain_cli.pretrain(["--config", str(recipe), "--resume", str(path), "--output_dir",
                                  str(tmp_path / "o")]) == 2
    _one_error_line(capsys, message)


@pytest.mark.parametrize("case", ["file", "unwritable"])
def test_unusable_output_folders_are_one_line(case, tmp_path, capsys):
    target = tmp_path / "out"
    if case == "file":
        target.write_text("x")
        needle = "is a file"
    else:
        tmp_path.chmod(0o500)
        needle = "cannot be written"
        if os.access(tmp_path, os.W_OK):  # root ignores permissions: a path under a file cannot be made instead
            tmp_path.chmod(0o700)
            (tmp_path / "f").write_text("x")
            target = tmp_path / "f" / "out"
    try:
        assert pretrain_cli.pretrain(["--output_dir", str(target), "--device", "cpu"]) == 2
    finally:
        tmp_path.chmod(0o700)
    _one_error_line(capsys, needle)


def test_train_net_missing_config_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        detection_cli.train_net(["--config-file", str(tmp_path / "nope.py")])
    assert e.value.code == 2
    _one_error_line(capsys, "nope.py not found")


def test_sixteen_unreadable_images_in_a_row_from_a_worker_are_one_line(tmp_path, capsys):
    folder = tmp_path / "data" / "train" / "c"
    folder.mkdir(parents=True)
    for i in range(20):
        (folder / f"{i:02d}.jpg").write_bytes(b"not an image")
    recipe = tmp_path / "r.yaml"
    cfg = _tiny_cfg(tmp_path, num_workers=1, data_path=str(tmp_path / "data"))
    recipe.write_text(yaml.safe_dump({k: cfg[k] for k in ("model", "model_kwargs", "decoder_depth", "input_size",
                                                          "batch_size", "num_workers", "device", "data_path",
                                                          "epochs", "warmup_epochs")}))
    assert pretrain_cli.pretrain(["--config", str(recipe), "--output_dir", str(tmp_path / "o")]) == 2
    _one_error_line(capsys, "16 consecutive unreadable images")
