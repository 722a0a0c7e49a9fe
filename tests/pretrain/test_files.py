"""Atomic writes (`pretrain.files`): a failed save keeps the previous file and leaves no temporary file; the check of
every output file a tool writes refuses what would lose data or fail."""
import os

import pytest
import torch

from pretrain import files as files_mod
from pretrain.errors import ConfigError


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


def _output_case(case: str, tmp_path) -> tuple[str, tuple, bool]:
    """(output path, inputs, overwrite) of a `check_output_file` case that must be refused."""
    src = tmp_path / "in.pth"
    src.write_bytes(b"weights")
    if case == "existing file":
        return str(src), (), False
    if case == "folder":
        (tmp_path / "d").mkdir()
        return str(tmp_path / "d"), (), True
    if case == "fifo":
        os.mkfifo(tmp_path / "fifo")
        return str(tmp_path / "fifo"), (), True
    if case == "link to /dev/null":
        (tmp_path / "null.pth").symlink_to("/dev/null")
        return str(tmp_path / "null.pth"), (), True
    if case == "the input":
        return str(src), (src,), True
    if case == "a link to the input":
        (tmp_path / "link.pth").symlink_to(src)
        return str(tmp_path / "link.pth"), (src,), True
    if case == "a hard link to the input":
        os.link(src, tmp_path / "hard.pth")
        return str(tmp_path / "hard.pth"), (str(src),), True
    if case == "under a file":
        return str(src / "sub" / "x.pth"), (), True
    if case == "unwritable":
        return "/proc/x.pth", (), True
    return str(tmp_path / "new") + "/", (), True  # "folder name"


@pytest.mark.parametrize("case, message", [
    ("existing file", "exists; pass --overwrite"),
    ("folder", "is a folder"),
    ("fifo", "not a regular file"),
    ("link to /dev/null", "not a regular file"),
    ("the input", "is also an input"),
    ("a link to the input", "is also an input"),
    ("a hard link to the input", "is also an input"),
    ("under a file", "is not a folder"),
    ("unwritable", "cannot write"),
    ("folder name", "names a folder"),
])
def test_check_output_file_refuses_what_would_lose_data_or_fail(case, message, tmp_path):
    path, inputs, overwrite = _output_case(case, tmp_path)
    with pytest.raises(ConfigError, match=message) as e:
        files_mod.check_output_file(path, inputs, overwrite=overwrite)
    assert "\n" not in str(e.value)
    assert (tmp_path / "in.pth").read_bytes() == b"weights"
    assert not list(tmp_path.glob(".*.tmp")) and not (tmp_path / "new").exists()


def test_check_output_file_allows_a_new_file_and_a_replacement_with_overwrite(tmp_path):
    (tmp_path / "in.pth").write_bytes(b"weights")
    files_mod.check_output_file(tmp_path / "new" / "out.pth", (tmp_path / "in.pth", None, "mae_vit_base"))
    (tmp_path / "out.pth").write_bytes(b"old")
    files_mod.check_output_file(tmp_path / "out.pth", (tmp_path / "in.pth",), overwrite=True)
    (tmp_path / "dangling.pth").symlink_to(tmp_path / "gone")
    files_mod.check_output_file(tmp_path / "dangling.pth", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling.pth", "in.pth", "out.pth"]  # no probe left
