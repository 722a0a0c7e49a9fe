"""The pretraining command lines (`pretrain.cli`): no weights file runs code unless the user trusts it.

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
