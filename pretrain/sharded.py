"""Sharded checkpoint folders (`torch.distributed.checkpoint`, DCP): written atomically, read without running code.

A folder `NAME.dcp/` holds DCP's files (one `__<rank>_0.distcp` per process that saved it and `.metadata`, the index
DCP writes last) and `meta.json` (epoch, config, loss window: what a single-file checkpoint holds besides tensors).

- `save_sharded`: every process writes its shards into `.NAME.dcp.tmp/`; the first then adds `meta.json` and swaps
  the folder into place. The previous folder is moved aside to `.NAME.dcp.previous/` for the two renames of the
  swap, so a kill at any moment leaves a complete checkpoint: `complete_folder` finds it.
- `load_sharded` fills a state dict (sharded or not, any number of processes) from a folder; `read_sharded`
  reads a folder's model tensors into one plain state dict, without a process group, for exporting.
- DCP's own reader unpickles `.metadata` and non-tensor values with `pickle`, which would run code from the folder;
  here `.metadata` is read by an unpickler that only builds DCP's index classes, and values with
  `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import ReadItem

from .errors import CheckpointError

SUFFIX = ".dcp"
META = "meta.json"
_INDEX = ".metadata"  # DCP's index, written when every shard is


def is_sharded(path: str | Path) -> bool:
    """Whether `path` is a complete DCP folder (its index written)."""
    return (Path(path) / _INDEX).is_file()


def staging(path: Path) -> Path:
    return path.parent / f".{path.name}.tmp"


def previous(path: Path) -> Path:
    return path.parent / f".{path.name}.previous"


def complete_folder(path: str | Path) -> Path | None:
    """`path` if it is a complete checkpoint folder; else the previous one a kill between the renames of a save left
    beside it; else None."""
    path = Path(path)
    return next((p for p in (path, previous(path)) if is_sharded(p) and (p / META).is_file()), None)


@contextmanager
def _quiet() -> Iterator[None]:
    """Without DCP's warning that one process without a process group loads or saves alone: meant here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_sharded(state_dict: dict[str, Any], meta: dict[str, Any], path: str | Path) -> None:
    """Write `state_dict` (each process its shards; called by every process of the group) and `meta` (JSON types) to
    the folder `path`, which then replaces the previous one (see the module's docstring).

    Raises:
        CheckpointError: the folder cannot be written; the previous checkpoint is intact.
    """
    path = Path(path)
    tmp, main = staging(path), not dist.is_initialized() or dist.get_rank() == 0
    try:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
        with _quiet():
            dcp.save(state_dict, storage_writer=FileSystemWriter(tmp), no_dist=not dist.is_initialized())
        if main:
            (tmp / META).write_text(json.dumps(meta) + "\n")  # inside the folder, which is renamed whole
            _swap(tmp, path)
    except (OSError, CheckpointException) as e:
        raise CheckpointError(f"cannot write {path} ({_cause(e)}); free space or fix permissions, then continue "
                              "with --resume auto (the previous checkpoint is intact)") from None


def _swap(new: Path, path: Path) -> None:
    """Rename the complete folder `new` to `path`, the existing `path` moved aside until then."""
    old = previous(path)
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)  # a kill's leftover; `path` is complete
        os.replace(path, old)
    os.replace(new, path)
    shutil.rmtree(old, ignore_errors=True)


def read_meta(path: str | Path) -> dict[str, Any]:
    """The `meta.json` of a checkpoint folder ({} when missing or unreadable)."""
    try:
        meta = json.loads((Path(path) / META).read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


class _IndexUnpickler(pickle.Unpickler):
    """Builds DCP's index (`Metadata` and the dataclasses it holds) and nothing else."""

    # the index's own classes by name: a dotted name (pickle protocol 4) would walk the module's attributes, e.g.
    # to the `os` it imports
    _ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
                ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
                *(("torch.distributed.checkpoint.metadata", n) for n in (
                    "BytesStorageMetadata", "ChunkStorageMetadata", "Metadata", "MetadataIndex", "StorageMeta",
                    "TensorProperties", "TensorStorageMetadata", "_MEM_FORMAT_ENCODING"))}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is no part of a checkpoint index")


class SafeReader(FileSystemReader):
    """DCP's file reader with `.metadata` read by `_IndexUnpickler` instead of `pickle.load`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        try:
            with open(Path(self.path) / _INDEX, "rb") as f:
                metadata = _IndexUnpickler(f).load()
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as e:
            raise CheckpointError(f"{self.path} holds no readable checkpoint index {_INDEX} ({_cause(e)}); the "
                                  "folder is incomplete, corrupt or not a DCP checkpoint") from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{self.path}/{_INDEX} holds a {type(metadata).__name__}, not a checkpoint index")
        if getattr(metadata, "storage_meta", None) is None:  # as FileSystemReader.read_metadata does
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """DCP's load planner with non-tensor values (e.g. an optimizer's hyper-parameters) read by
    `torch.load(weights_only=True)`; what passes is saved again for the base planner, which loads it unrestricted."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        checked = io.BytesIO()
        torch.save(torch.load(value, weights_only=True), checked)
        checked.seek(0)
        super().load_bytes(read_item, checked)


def load_sharded(state_dict: dict[str, Any], path: str | Path) -> None:
    """Fill `state_dict` in place from the checkpoint folder `path` (every process of the group calls it, with the
    state dict of its shards; or one process without a group). Any number of processes may read what any number
    wrote.

    Raises:
        CheckpointError: the folder lacks a key of `state_dict`, or a shape differs.
    """
    SafeReader(path).read_metadata()  # a missing or hostile index as its own one line, before DCP's collectives
    try:
        with _quiet():
            dcp.load(state_dict, storage_reader=SafeReader(path), planner=SafePlanner(),
                     no_dist=not dist.is_initialized())
    except CheckpointException as e:
        raise CheckpointError(f"{path} does not fit this run's model and optimizer ({_cause(e)}); resume it with "
                              "the model and flags it was saved with") from None


def read_sharded(path: str | Path, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """The tensors under `prefix` in the checkpoint folder `path` as one plain state dict on CPU (prefix removed),
    in one process without a process group."""
    index = SafeReader(path).read_metadata()
    wanted = {key: torch.empty(md.size, dtype=md.properties.dtype)
              for key, md in index.state_dict_metadata.items()
              if key.startswith(prefix) and isinstance(md, TensorStorageMetadata)}
    try:
        with _quiet():
            dcp.load(wanted, storage_reader=SafeReader(path), planner=SafePlanner(), no_dist=True)
    except CheckpointException as e:
        raise CheckpointError(f"cannot read {path} ({_cause(e)}); the folder is incomplete or corrupt") from None
    return {key[len(prefix):]: tensor for key, tensor in wanted.items()}


def _cause(e: BaseException) -> str:
    """The first line of what went wrong; DCP wraps each process's exception in a `CheckpointException`, from which
    a Ctrl-C or SIGTERM is raised again as itself."""
    if isinstance(e, CheckpointException):
        for failure in e.failures.values():
            inner = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(inner, KeyboardInterrupt):
                raise inner
            return _cause(inner)
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:160]}" if lines else type(e).__name__

