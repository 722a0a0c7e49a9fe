"""Atomic writes (`pretrain.files`): a failed save keeps the previous file and leaves no temporary file; the check of
every output file a tool writes refuses what would lose data or fail; the safe reader tells a corrupt file from one
holding pickled objects before it suggests --trust-pickle."""
import argparse
import os
import pickle
import random
import zipfile

import pytest
import torch

from pretrain import files as files_mod
from pretrain.errors import CheckpointError, ConfigError


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


# ------------------------------------------------------------------------------------------ read_checkpoint

def _random_bytes(seed: int, size: int = 4096) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.mark.parametrize("head", [b"", b"\x80", b"\x80\x02", b"PK\x03\x04"], ids=["raw", "0x80", "proto2", "zip"])
@pytest.mark.parametrize("seed", range(4))
def test_random_bytes_are_called_corrupt_not_pickled(seed, head, tmp_path):
    # random files, some starting as a pickle (0x80, the PROTO opcode) or a zip archive does
    path = tmp_path / "random.pth"
    path.write_bytes(head + _random_bytes(seed)[len(head):])
    with pytest.raises(CheckpointError) as e:
        files_mod.read_checkpoint(path)
    assert "corrupt" in str(e.value) and "--trust-pickle" not in str(e.value), str(e.value)


def test_a_torch_archive_with_a_corrupt_pickle_is_called_corrupt(tmp_path):
    good, bad = tmp_path / "good.pth", tmp_path / "bad.pth"
    torch.save({"model": {"w": torch.ones(2)}}, good)
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("data.pkl"):
                data = b"\x80\x02" + _random_bytes(1, len(data))
            dst.writestr(item, data)
    with pytest.raises(CheckpointError, match="corrupt") as e:
        files_mod.read_checkpoint(bad)
    assert "--trust-pickle" not in str(e.value)


@pytest.mark.parametrize("writer", ["torch_zip", "torch_legacy", "pickle_protocol_0", "pickle_protocol_4"])
def test_a_real_pickle_with_a_global_needs_trust_pickle(writer, tmp_path):
    path = tmp_path / "released.pth"
    obj = {"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=1e-3)}  # as MAE's main_pretrain saves
    if writer.startswith("torch"):
        torch.save(obj, path, _use_new_zipfile_serialization=writer == "torch_zip")
    else:
        path.write_bytes(pickle.dumps({"args": argparse.Namespace(lr=1e-3)}, protocol=int(writer[-1])))
    with pytest.raises(CheckpointError, match="--trust-pickle") as e:
        files_mod.read_checkpoint(path)
    assert "argparse.Namespace" in str(e.value) and "\n" not in str(e.value)
    if writer.startswith("torch"):
        assert files_mod.read_checkpoint(path, trust_pickle=True)["args"].lr == 1e-3


def test_a_folder_is_built_once_and_a_finished_one_is_never_replaced(tmp_path):
    calls = []

    def write(staging):
        calls.append(staging)
        (staging / "data.txt").write_text(str(len(calls)))
        if len(calls) == 1:  # another builder finishes while this one writes
            files_mod.build_folder_once(tmp_path / "set", write)

    folder = files_mod.build_folder_once(tmp_path / "set", write)
    inode = folder.stat().st_ino
    assert (folder / "data.txt").read_text() == "2" and (folder / "DONE").is_file()  # the first finished, kept
    assert files_mod.build_folder_once(tmp_path / "set", write) == folder and len(calls) == 2
    assert folder.stat().st_ino == inode and sorted(p.name for p in tmp_path.iterdir()) == ["set"]
