"""One run per folder: an exclusive lock on `FOLDER/.lock` for as long as a run writes there.

Pretraining, `tools/train_net.py` and the demo each hold the lock of their output folder, so a second run into it
is refused in one line naming the first one's PID instead of mixing its logs and checkpoints into the first's.
`fcntl.flock` ties the lock to the open file, and the kernel drops it when the holding process ends, however it
ends: a `.lock` left by a killed run blocks nothing, and there is no stale lock to clean up. The file holds the
holder's PID, for the message. It is never deleted: a run that unlinked it on exit could let two later runs lock
two different files of the same name.

    with run_lock(output_dir, "--output_dir"):
        ...  # the run
"""
from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import ConfigError, UserError

__all__ = ["LOCK_FILE", "FolderInUse", "run_lock"]

LOCK_FILE = ".lock"
logger = logging.getLogger("pretrain")


class FolderInUse(UserError):
    """Another run holds the folder's lock; the message names its PID."""


@contextmanager
def run_lock(folder: str | Path, label: str = "output folder", enabled: bool = True) -> Iterator[Path]:
    """Hold the exclusive lock of `folder` (made if missing) for the duration of the block.

    Args:
        folder: the run's output folder.
        label: how the user named it, for the messages (`--output_dir`, `train.output_dir`, `--output`).
        enabled: False takes nothing: under torchrun the first process holds the lock for the whole run.

    Yields:
        `folder`, as a Path.

    Raises:
        FolderInUse: another process, or another block of this one, holds the lock; the message names its PID.
        ConfigError: `folder` is a file, or cannot be made or written.
    """
    folder = Path(folder)
    if not enabled:
        yield folder
        return
    fd = _open(folder, label)
    locked = False
    try:
        locked = _lock(fd, folder, label)
        if locked:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield folder
    finally:
        if locked:
            os.ftruncate(fd, 0)  # a PID is only ever in the file while its process holds the lock, or after a kill
        os.close(fd)  # releases the lock


def _open(folder: Path, label: str) -> int:
    """The lock file's descriptor, the folder made first."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except FileExistsError:
        raise ConfigError(f"{label} {folder} is a file; give a folder") from None
    except OSError as e:
        raise ConfigError(f"{label} {folder} cannot be written ({e.strerror}); pick a folder you can write") from None


def _lock(fd: int, folder: Path, label: str) -> bool:
    """Take the lock without waiting; False where the file system cannot lock (the run then goes on unguarded).

    Raises:
        FolderInUse: another holder has it.
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        who = f"PID {holder}" if holder.isdigit() else "its PID not written yet"
        raise FolderInUse(f"{label} {folder} is in use by another run ({who}); wait for it to end or stop it, or "
                          f"give another {label}") from None
    except OSError as e:  # e.g. a network file system without flock
        logger.warning("cannot lock %s (%s): a second run into it would not be refused", folder, e.strerror)
        return False
    return True
