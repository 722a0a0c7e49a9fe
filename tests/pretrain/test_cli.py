"""The pretraining command lines (`pretrain.cli`): no weights file runs code unless the user trusts it, and the
export replaces no file without --overwrite, and never its input or a folder.

Every case here failed (ran the payload) before the fix it guards.
"""
import argparse
from pathlib import Path

import pytest
import torch
import yaml

from pretrain import cli as pretrain_cli
from pretrain.models import create_model


def _tools(path: Path, tmp_path: Path) -> dict:
    out = tmp_path / "out"
    return {
        "visualize": lambda: pretrain_cli.visualize([str(path), "--builtin", "1", "--output", str(out)]),
        "analyze_attention": lambda: pretrain_cli.analyze_attention([str(path), "--builtin", "1", "--output", str(out)]),
        "export_encoder": lambda: pretrain_cli.export_encoder([str(path), str(out / "enc.pth")]),
        "pretrain --resume": lambda: pretrain_cli.pretrain(["--resume", str(path), "--output_dir", str(out / "p"),
                                                           "--device", "cpu"]),
        "pretrain --init_from": lambda: pretrain_cli.pretrain(["--init_from", str(path), "--output_dir",
                                                               str(out / "q"), "--device", "cpu"]),
    }


@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
@pytest.mark.parametrize("tool", ["visualize", "analyze_attention", "export_encoder", "pretrain --resume",
                                  "pretrain --init_from"])
def test_no_tool_runs_code_from_a_weights_file(tool, suffix, tmp_path, hostile_weights, one_error_line):
    # (the detection and workflows tools: tests/detection/test_cli.py, tests/workflows/test_cli.py)
    path, marker = hostile_weights(suffix)
    assert _tools(path, tmp_path)[tool]() == 2
    assert not marker.exists(), f"{tool} ran the payload of {path.name}"
    one_error_line("--trust-pickle")


def test_export_with_its_arguments_swapped_keeps_the_checkpoint(tmp_path, tiny_checkpoint, one_error_line):
    ckpt = tiny_checkpoint(tmp_path / "checkpoint.pth")
    assert pretrain_cli.export_encoder([str(ckpt), str(tmp_path / "enc.pth")]) == 0
    before = ckpt.read_bytes()
    assert pretrain_cli.export_encoder([str(tmp_path / "enc.pth"), str(ckpt)]) == 2
    one_error_line(f"{ckpt} exists; pass --overwrite")
    assert ckpt.read_bytes() == before
    assert pretrain_cli.export_encoder([str(ckpt), str(ckpt), "--overwrite"]) == 2
    one_error_line("is also an input")
    assert ckpt.read_bytes() == before
    assert pretrain_cli.export_encoder([str(tmp_path / "enc.pth"), str(ckpt), "--overwrite"]) == 0
    assert set(torch.load(ckpt, weights_only=True)) == {"model", "meta"}  # replaced, as asked


@pytest.mark.parametrize("case, message", [("folder", "is a folder"), ("under a file", "is not a folder"),
                                           ("unwritable", "cannot write")])
def test_export_to_a_path_it_cannot_write_is_one_line(case, message, tmp_path, tiny_checkpoint, one_error_line):
    ckpt = tiny_checkpoint(tmp_path / "checkpoint.pth")
    (tmp_path / "folder").mkdir()
    out = {"folder": tmp_path / "folder", "under a file": ckpt / "enc.pth", "unwritable": Path("/proc/enc.pth")}[case]
    assert pretrain_cli.export_encoder([str(ckpt), str(out), "--overwrite"]) == 2
    one_error_line(message)
    assert (tmp_path / "folder").is_dir() and not list((tmp_path / "folder").iterdir())


@pytest.mark.parametrize("case", ["wrong_shape", "nan"])
def test_export_encoder_refuses_a_wrong_shape_or_non_finite_tensor(case, tmp_path, tiny_checkpoint, one_error_line):
    src = tiny_checkpoint(tmp_path / "ck.pth")
    ckpt = torch.load(src, weights_only=True)
    if case == "wrong_shape":
        ckpt["model"]["blocks.0.attn.qkv.weight"] = torch.zeros(7, 5)
        needles = ("blocks.0.attn.qkv.weight has shape (7, 5)", "expected (96, 32)")
    else:
        ckpt["model"]["blocks.1.mlp.fc2.weight"][0, 0] = float("nan")
        needles = ("blocks.1.mlp.fc2.weight (32, 128)", "NaN or infinite")
    torch.save(ckpt, src)
    out = tmp_path / "enc.pth"
    assert pretrain_cli.export_encoder([str(src), str(out)]) == 2
    one_error_line(*needles)
    assert not out.exists()


def test_main_pretrain_takes_trust_pickle_for_the_files_it_reads(tmp_path, tiny_cfg, capsys, one_error_line):
    # a release storing `args` (as MAE's main_pretrain saves) for --init_from, a checkpoint storing it for --resume
    cfg = tiny_cfg(tmp_path, epochs=1, warmup_epochs=0)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({k: cfg[k] for k in ("model", "model_kwargs", "decoder_depth", "input_size",
                                                          "batch_size", "builtin_size", "num_workers", "device",
                                                          "epochs", "warmup_epochs")}))
    released = tmp_path / "released.pth"
    torch.save({"model": create_model(cfg).state_dict(), "args": argparse.Namespace(lr=1e-3)}, released)
    out = tmp_path / "run"
    flags = ["--config", str(recipe), "--init_from", str(released), "--output_dir", str(out)]
    assert pretrain_cli.pretrain(flags) == 2
    one_error_line("argparse.Namespace", "--trust-pickle")
    assert pretrain_cli.pretrain(flags + ["--trust-pickle"]) == 0

    ckpt = torch.load(out / "checkpoint-last.pth", weights_only=True)
    torch.save({**ckpt, "args": argparse.Namespace(lr=1e-3)}, tmp_path / "resume.pth")
    flags = ["--config", str(recipe), "--resume", str(tmp_path / "resume.pth"), "--output_dir", str(out),
             "--epochs", "2"]
    assert pretrain_cli.pretrain(flags) == 2
    one_error_line("--trust-pickle")
    assert pretrain_cli.pretrain(flags + ["--trust-pickle"]) == 0
    assert torch.load(out / "checkpoint-last.pth", weights_only=True)["epoch"] == 1

    recipe.write_text(recipe.read_text() + "trust_pickle: true\n")  # only the command line trusts a file
    assert pretrain_cli.pretrain(flags) == 2
    one_error_line("trust_pickle", "--trust-pickle")
