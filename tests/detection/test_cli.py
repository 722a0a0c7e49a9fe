"""The detection command lines (`detection.cli`): no weights file runs code unless the user trusts it, and a missing
config is one line.

Every case here failed (ran the payload, or printed a traceback) before the fix it guards.
"""
from pathlib import Path

import pytest

from detection import cli as detection_cli

ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "configs/demo/mask_rcnn_vit_smoke_builtin.py")


def _tools(path: Path, tmp_path: Path) -> dict:
    out = tmp_path / "out"
    return {
        "convert": lambda: detection_cli.convert([str(path), str(out / "d2.pth"), "--embed-dim", "32", "--depth", "2",
                                                  "--patch-size", "8"]),
        "train_net init": lambda: detection_cli.train_net(["--config-file", SMOKE, f"train.init_checkpoint={path}",
                                                           f"train.output_dir={out / 'd'}"]),
        "train_net eval": lambda: detection_cli.train_net(["--config-file", SMOKE, "--eval-only",
                                                           f"train.init_checkpoint={path}",
                                                           f"train.output_dir={out / 'e'}"]),
    }


@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
@pytest.mark.parametrize("tool", ["convert", "train_net init", "train_net eval"])
def test_no_tool_runs_code_from_a_weights_file(tool, suffix, tmp_path, hostile_weights, one_error_line):
    # (the pretraining and workflows tools: tests/pretrain/test_cli.py, tests/workflows/test_cli.py)
    path, marker = hostile_weights(suffix)
    assert _tools(path, tmp_path)[tool]() == 2
    assert not marker.exists(), f"{tool} ran the payload of {path.name}"
    one_error_line("--trust-pickle")


def test_train_net_missing_config_is_one_line(tmp_path, one_error_line):
    with pytest.raises(SystemExit) as e:
        detection_cli.train_net(["--config-file", str(tmp_path / "nope.py")])
    assert e.value.code == 2
    one_error_line("nope.py not found")
