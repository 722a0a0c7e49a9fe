"""Files on disk: atomic writes, and the one safe reader of weights files.

- `write_atomic(path, write)` is every write in the project that must not be left half done (checkpoints,
  snapshots, summaries, AP files, logs rewritten in place): `write` fills a temporary file in the same folder,
  which is flushed, synced and renamed over `path`. A kill mid-write leaves the previous file, never a truncated
  one; the temporary file (`.NAME.*.tmp`) is removed on error, and a kill's leftover is recognisable by its name.
- `save_atomic` (torch objects), `write_text_atomic` and `write_json_atomic` are its three uses;
  `build_folder_once` is the same for a folder of generated data.
- `check_output_file` refuses, before any work, an output file that would destroy data or cannot be written.
- `read_checkpoint(path)` reads `.safetensors` with safetensors, a sharded checkpoint folder (`NAME.dcp/`) with
  `pretrain.sharded`, and anything else with `torch.load(weights_only=True)`: no code from a file runs unless the
  user passes `--trust-pickle`.
"""
from __future__ import annotations

import json
import mmap
import os
import pickle
import shutil
import pickletools
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .errors import CheckpointError, ConfigError, UntrustedPickleError
from .sharded import is_sharded, read_meta, read_sharded

__all__ = ["write_atomic", "save_atomic", "write_text_atomic", "write_json_atomic", "build_folder_once",
           "check_output_file", "read_checkpoint"]


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call `write(f)` on a temporary binary file next to `path`, sync it, then rename it over `path`.

    A crash mid-write leaves the previous file intact, never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_atomic(obj: Any, path: str | Path) -> None:
    """`torch.save(obj)` to `path`, atomically."""
    write_atomic(path, lambda f: torch.save(obj, f))


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path`, atomically."""
    write_atomic(path, lambda f: f.write(text.encode()))


def write_json_atomic(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    """Write `obj` as JSON (and a final newline) to `path`, atomically."""
    write_text_atomic(path, json.dumps(obj, indent=indent) + "\n")


def build_folder_once(folder: str | Path, write: Callable[[Path], None], done: str = "DONE") -> Path:
    """`folder`, made by `write(staging)` into a temporary folder beside it and renamed into place with a `done`
    marker, unless a complete one is there: concurrent builders (torchrun's ranks, data-loader workers) never see
    half a folder, and a finished one is never replaced under a reader. An interrupted build leaves only its
    temporary folder, removed on the way out."""
    folder = Path(folder)
    if (folder / done).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        write(staging)
        (staging / done).write_text("complete\n")
        os.replace(staging, folder)
    except OSError:
        if not (folder / done).is_file():  # not a race lost to another builder: a real failure
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def check_output_file(path: str | Path, inputs: Iterable[str | Path | None] = (), overwrite: bool = False) -> None:
    """Refuse, before any work, an output file that would destroy data or cannot be written: the check of every
    tool that writes a file the user names (it then writes with `write_atomic`).

    Refused whatever `overwrite` says: the same file as one of `inputs` (also through a link), an existing folder,
    device, fifo or socket, a path under a file or in a folder where no file can be created (e.g. `/proc`); an
    existing file unless `overwrite`. A symbolic link is replaced by the new file; its target is kept.

    Args:
        path: the output file the user named.
        inputs: the files the tool reads; None and paths that do not exist are skipped.
        overwrite: the user's `--overwrite`: replace an existing regular file.

    Raises:
        ConfigError: one line naming the path and what to do instead.
    """
    if str(path).endswith(("/", os.sep)):
        raise ConfigError(f"output {path} names a folder (it ends in '/'); give a file name")
    path = Path(path)
    for source in inputs:
        if source is not None and _same_file(path, Path(source)):
            raise ConfigError(f"output {path} is also an input ({source}); write to another path")
    if path.is_dir():
        raise ConfigError(f"output {path} is a folder; give a file name (inside it, if you like)")
    if path.exists() and not path.is_file():
        raise ConfigError(f"output {path} is not a regular file (a device, fifo or socket); give another path")
    if os.path.lexists(path) and not overwrite:
        raise ConfigError(f"output {path} exists; pass --overwrite to replace it, or give another path")
    folder = path.parent
    while not os.path.lexists(folder):  # the folder write_atomic would create the rest under
        folder = folder.parent
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder, so output {path} cannot be written under it; give another path")
    try:  # whether a file can be created there (permissions, a read-only file system, /proc), as write_atomic does
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as e:
        raise ConfigError(f"cannot write output {path} ({e.strerror} in {folder}); give a path in a writable "
                          "folder") from None
    os.close(fd)
    os.unlink(probe)


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: the same inode if both exist (links included), else the same resolved path."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return a.resolve() == b.resolve()
    except OSError:  # a link loop, a path too long
        return False


def read_checkpoint(path: str | Path, trust_pickle: bool = False) -> Any:
    """Load a weights file on CPU without running code from it: the project's one loader.

    `.safetensors` files are read with safetensors; a sharded checkpoint folder (`pretrain.sharded`) as
    `{"model": its model tensors whole, "epoch", "config", "loss_window"}`; anything else with
    `torch.load(weights_only=True)`, which refuses pickled objects other than tensors and plain containers. `trust_pickle=True` (the command
    lines' `--trust-pickle`) lifts that for files the user trusts, such as MAE's releases that store `args`.

    Raises:
        CheckpointError: the file is missing, empty, corrupt or truncated.
        UntrustedPickleError: (a `CheckpointError`) the file holds pickled objects; the message names them and
            `--trust-pickle`. Only a well-formed pickle naming Python objects gets it, never a corrupt file.
    """
    path = Path(path)
    if path.is_dir() and is_sharded(path):  # an --fsdp run's folder: its model tensors and metadata, no optimizer
        return {**read_meta(path), "model": read_sharded(path)}
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; check the path")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes), e.g. from an interrupted copy; "
                              "write or download it again")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read {path} as safetensors ({_first_line(e)}); is it complete?") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        # refused: an object besides tensors, or bytes that are no pickle at all (random or text); only a
        # well-formed pickle that names Python objects gets the advice to trust it
        names = _pickled_objects(path) if "weights only load failed" in str(e).lower() else None
        if names is not None:
            shown = f" ({', '.join(names[:3])})" if names else ""
            raise UntrustedPickleError(f"{path} holds pickled Python objects besides tensors{shown}, and loading it "
                                       "would run code from the file; pass --trust-pickle only if you trust its "
                                       "source") from None
        raise CheckpointError(f"{path} is corrupt or not a torch checkpoint (no pickle torch can read); "
                              "write or download it again") from None
    except Exception as e:  # noqa: BLE001 - zip, EOF and key errors of truncated or foreign files
        raise CheckpointError(f"{path} is corrupt, truncated or not a torch checkpoint ({_first_line(e)}); "
                              "write or download it again") from None


_LEGACY_PICKLES = 5  # torch's legacy format: magic number, protocol, sys info, the object, storage keys; then data
_GLOBALS = {"GLOBAL", "INST", "STACK_GLOBAL"}  # the opcodes that name a Python object to import
_TORCH_OWN = ("torch.", "collections.OrderedDict")  # what torch files name themselves: not worth showing


def _pickled_objects(path: Path) -> list[str] | None:
    """The Python objects (module.name, torch's own left out) named by the pickle that torch reads from `path` (a
    zip archive's data.pkl, else the pickles the file starts with), read without running it; None when those bytes
    are no well-formed pickle or name no object, i.e. the file is corrupt rather than unsafe."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
                with archive.open(name) as data:  # streamed: read only as far as the opcodes go
                    return _named_objects(data, 1)
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _named_objects(data, _LEGACY_PICKLES)  # mmap: a corrupt length reads no more than the file
    except Exception:  # noqa: BLE001 - an unknown opcode, a truncated argument, a bad archive: no pickle
        return None


def _named_objects(data: IO[bytes] | mmap.mmap, pickles: int) -> list[str] | None:
    """The objects named by up to `pickles` consecutive pickles in `data` (as `_pickled_objects`), or None if none.

    Raises:
        ValueError: a pickle is malformed or ends before its STOP opcode (`pickletools.genops`).
    """
    names: list[str] = []
    strings: list[str] = []  # the last two strings pushed: STACK_GLOBAL's module and name
    for _ in range(pickles):
        start = data.tell()
        if not data.read(1):
            break
        data.seek(start)
        for op, arg, _ in pickletools.genops(data):
            if op.name in _GLOBALS:
                names.append(".".join(strings) if op.name == "STACK_GLOBAL" else str(arg).replace(" ", "."))
            elif isinstance(arg, str):
                strings = (strings + [arg])[-2:]
    if not names:
        return None
    return list(dict.fromkeys(n for n in names if not n.startswith(_TORCH_OWN)))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:120]}" if text else type(e).__name__
