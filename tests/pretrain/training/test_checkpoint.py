"""Resume checkpoints (`pretrain.training.checkpoint`): what they hold, loadable with weights_only, and unusable ones
as one-line errors."""
from pathlib import Path

import pytest
import torch
import yaml

from pretrain import cli as pretrain_cli
from pretrain.models import create_model
from pretrain.training.checkpoint import resolve_resume
from pretrain.training.trainer import run


def test_checkpoint_round_trip_weights_only(tmp_path, tiny_cfg):
    cfg = tiny_cfg(tmp_path, epochs=1)
    run(cfg)
    out = Path(cfg["output_dir"])
    ckpt = torch.load(out / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    assert set(ckpt) == {"model", "optimizer", "scaler", "epoch", "config", "loss_window"}
    assert ckpt["epoch"] == 0 and ckpt["config"]["model"] == cfg["model"]
    assert (out / "checkpoint-0.pth").is_file() and (out / "recon" / "epoch_0000.png").is_file()
    model = create_model(cfg)
    model.load_state_dict(ckpt["model"], strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt["model"][k]), k
    assert yaml.safe_load((out / "config.yaml").read_text())["lr_resolved"] == pytest.approx(1e-2 * 4 / 256 * 1.0)


@pytest.mark.parametrize("kind, message", [
    ("empty", "is empty (0 bytes)"),
    ("tensor", "holds a Tensor, not a checkpoint dict"),
    ("list", "holds a list, not a checkpoint dict"),
    ("released", "no resume checkpoint of this trainer"),
    ("other_size", "tensors of another shape"),
])
def test_unusable_resume_checkpoints_are_one_line(kind, message, tmp_path, tiny_cfg, one_error_line):
    path = tmp_path / "ck.pth"
    cfg = tiny_cfg(tmp_path)
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "list":
        torch.save([torch.zeros(3)], path)
    elif kind == "released":
        torch.save({"model": create_model(cfg).state_dict()}, path)
    else:
        other = create_model({**cfg, "model_kwargs": {**cfg["model_kwargs"], "embed_dim": 48}})
        torch.save({"model": other.state_dict(), "optimizer": {}, "epoch": 0}, path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({k: cfg[k] for k in ("model", "model_kwargs", "decoder_depth", "input_size",
                                                          "batch_size", "builtin_size", "num_workers", "device")}))
    assert pretrain_cli.pretrain(["--config", str(recipe), "--resume", str(path), "--output_dir",
                                  str(tmp_path / "o")]) == 2
    one_error_line(message)


def test_resume_auto_takes_checkpoint_last_else_the_newest_numbered_checkpoint(tmp_path):
    assert resolve_resume("auto", tmp_path) is None and resolve_resume("", tmp_path) is None
    for name in ("checkpoint-2.pth", "checkpoint-10.pth", "checkpoint-9.pth", "checkpoint-x.pth"):
        (tmp_path / name).write_bytes(b"")
    assert resolve_resume("auto", tmp_path) == tmp_path / "checkpoint-10.pth"  # by epoch, not by name
    (tmp_path / "checkpoint-last.pth").write_bytes(b"")
    assert resolve_resume("auto", tmp_path) == tmp_path / "checkpoint-last.pth"
    assert resolve_resume("some.pth", tmp_path) == Path("some.pth")
