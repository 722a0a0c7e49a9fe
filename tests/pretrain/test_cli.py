"""The pretraining command lines (`pretrain.cli`): no weights file runs code unless the user trusts it, and the
export replaces no file without --overwrite, and never its input or a folder.

Every case here failed (ran the payload) before the fix it guards.
"""
from pathlib import Path

import pytest
import torch

from pretrain import cli as pretrain_cli


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
