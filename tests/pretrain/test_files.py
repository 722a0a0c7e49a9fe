"""Atomic writes (`pretrain.files`): a failed save keeps the previous file and leaves no temporary file."""
import pytest
import torch

from pretrain import files as files_mod


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
