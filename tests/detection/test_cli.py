"""The detection command lines (`detection.cli`): no weights file runs code unless the user trusts it, a missing
config is one line, and the converter replaces only a regular file other than its input.

Every case here failed (ran the payload, or printed a traceback) before the fix it guards.
"""
import os
import stat
from pathlib import Path

import pytest

from detection import cli as detection_cli

ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "configs/demo/mask_rcnn_vit_smoke_builtin.py")
TINY_TARGET = ["--embed-dim", "32", "--depth", "2", "--patch-size", "8"]  # the conftest's tiny_checkpoint


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


def _target(path: Path, kind: str) -> Path:
    """An output path of `kind` next to the input: a folder, a link to /dev/null, a fifo, a path under a file."""
    out = path.parent / "out"
    if kind == "folder":
        out.mkdir()
    elif kind == "link to /dev/null":
        out.symlink_to("/dev/null")
    elif kind == "fifo":
        os.mkfifo(out)
    elif kind == "under a file":
        return path / "d2.pth"
    elif kind == "the input":
        return path
    return out


@pytest.mark.parametrize("kind, message", [("folder", "is a folder"), ("link to /dev/null", "not a regular file"),
                                           ("fifo", "not a regular file"), ("under a file", "is not a folder"),
                                           ("the input", "is also an input")])
def test_convert_overwrite_replaces_only_a_regular_file_other_than_its_input(kind, message, tmp_path, tiny_checkpoint,
                                                                            one_error_line):
    ckpt = tiny_checkpoint(tmp_path / "m.pth")
    before = ckpt.read_bytes()
    out = _target(ckpt, kind)
    file_type = stat.S_IFMT(os.lstat(out).st_mode) if os.path.lexists(out) else None
    assert detection_cli.convert([str(ckpt), str(out), *TINY_TARGET, "--overwrite"]) == 2
    one_error_line(message)
    assert ckpt.read_bytes() == before
    assert (stat.S_IFMT(os.lstat(out).st_mode) if os.path.lexists(out) else None) == file_type  # left as it was


def test_convert_to_an_unwritable_path_is_one_line(tmp_path, tiny_checkpoint, one_error_line):
    ckpt = tiny_checkpoint(tmp_path / "m.pth")
    assert detection_cli.convert([str(ckpt), "/proc/d2.pth", *TINY_TARGET]) == 2
    one_error_line("cannot write")


def test_convert_refuses_the_weights_file_of_its_input_folder(timm_files, one_error_line):
    _, folder = timm_files  # a save_pretrained folder: the converter reads its model.safetensors
    before = (folder / "model.safetensors").read_bytes()
    assert detection_cli.convert([str(folder), str(folder / "model.safetensors"), "--embed-dim", "192", "--depth", "2",
                                  "--patch-size", "8", "--overwrite"]) == 2
    one_error_line("is also an input")
    assert (folder / "model.safetensors").read_bytes() == before
