"""A run's output folder, shared by pretraining and fine-tuning: an earlier run refused, resumed or replaced, the
per-epoch log, atomic checkpoint writes, and the one-line messages of a stopped run that name what it kept."""
from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, ConfigError, UserError, interrupt_name, interrupt_status
from ..files import save_atomic, write_text_atomic
from ..weights.releases import weights_file
from .checkpoint import LAST, checkpoint_epoch, numbered_checkpoints, resolve_resume
from .preempt import Preempted

logger = logging.getLogger("pretrain")


class Interrupted(UserError):
    """Ctrl-C or SIGTERM during a run; the message names the checkpoint that was kept. Exit status 130 for Ctrl-C,
    143 for SIGTERM (`errors.interrupt_status`)."""

    exit_code = 130


_RUN_FILES = (LAST, "checkpoint-best.pth", "config.yaml", "log.txt")  # checkpoint-best.pth: fine-tuning's


def open_run_folder(cfg: dict[str, Any], out: Path, main: bool, inputs: Iterable[str | None]) -> Path | None:
    """The checkpoint the run resumes from (`resolve_resume` of `--resume`; None for a new run), once the main
    process has made `out` ready for it (`prepare_output_dir`; `inputs`: the files the run reads)."""
    resume = resolve_resume(cfg["resume"], out)
    if main:
        prepare_output_dir(out, resume is not None or cfg["resume"] == "auto", cfg["overwrite"], inputs)
    return resume


def earlier_run(out: Path) -> list[str]:
    """What in `out` shows an earlier run: its log, configuration, and any checkpoint or snapshot."""
    found = [f for f in _RUN_FILES if (out / f).exists()]
    found += [p.name for p in numbered_checkpoints(out)]
    return found + [f"snapshots/{p.name}" for p in sorted((out / "snapshots").glob("step-*.pth"))]


def prepare_output_dir(out: Path, resuming: bool, overwrite: bool, inputs: Iterable[str | None] = ()) -> None:
    """Make `out` (made and locked by `run_lock`) ready for a run: writable, holding no earlier run unless
    resuming or overwriting.

    Also removes temporary files that a kill during an atomic save leaves behind. With `overwrite`, an earlier
    run's checkpoints, logs, snapshots, figures and TensorBoard events are deleted first, unless one of them is a
    file the run reads (`inputs`: `--init_from`, `--finetune`, ...).

    Raises:
        ConfigError: `out` cannot be written, holds an earlier run (without resume / overwrite), or `overwrite` would
            delete one of `inputs`.
    """
    try:
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--output_dir {out} cannot be written ({e.strerror}); pick a folder you can write") from None
    for tmp in out.glob(".*.tmp"):  # left by a kill during save_atomic; the file it was replacing is intact
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()  # a folder: an --fsdp checkpoint's (pretrain.sharded)
    earlier = earlier_run(out)
    if not earlier or resuming:
        return
    if not overwrite:
        raise ConfigError(f"--output_dir {out} holds an earlier run ({earlier[0]}); pass --resume auto to continue "
                          "it, --overwrite to replace it, or give another --output_dir")
    files = [*out.glob("checkpoint-*.pth"), *(out / f for f in _RUN_FILES)]
    folders = [*(out / sub for sub in ("snapshots", "recon", "tensorboard")), *out.glob("checkpoint-*.dcp"),
               *out.glob(".checkpoint-*.dcp.previous")]
    for given in filter(None, inputs):
        path = weights_file(given).resolve()
        if path in {f.resolve() for f in files} or any(path.is_relative_to(d.resolve()) for d in folders):
            raise ConfigError(f"--overwrite would delete {given}, which this run reads; copy it out of {out} first, "
                              "or give another --output_dir")
    for path in files:
        path.unlink(missing_ok=True)
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def trim_log(out: Path, start_epoch: int) -> None:
    """Keep only `log.txt` lines of epochs before `start_epoch`: an epoch redone after a kill is logged once."""
    if (out / "log.txt").is_file():
        kept = [r for r in read_log(out) if r["epoch"] < start_epoch]
        write_text_atomic(out / "log.txt", "".join(json.dumps(r) + "\n" for r in kept))


def save_checkpoint(obj: Any, path: Path) -> None:
    """`save_atomic`, with a full disk or a read-only folder as one line that says the previous file is intact."""
    try:
        save_atomic(obj, path)
    except OSError as e:
        raise CheckpointError(f"cannot write {path} ({e.strerror}); free space or fix permissions, then continue with "
                              "--resume auto (the previous checkpoint is intact)") from None


def read_log(out: str | Path) -> list[dict[str, Any]]:
    """The per-epoch records of a run's `log.txt` (one JSON object a line: `epoch`, `train_loss`, ...), in order."""
    return [json.loads(line) for line in (Path(out) / "log.txt").read_text().splitlines()]


def kept_checkpoint(out: Path) -> str:
    """What a stopped run left to resume from, read from the folder at the time it stopped (a stop may land just
    before or just after a checkpoint's write)."""
    path = resolve_resume("auto", out)
    epoch = None if path is None else checkpoint_epoch(path)
    if epoch is None:
        return "no checkpoint was written yet"
    # a preempted run's checkpoint holds its last finished epoch, -1 for a stop inside epoch 0
    return f"the kept checkpoint {path} is from {f'epoch {epoch}' if epoch >= 0 else 'inside epoch 0'}"


def stopped_error(e: KeyboardInterrupt, where: str, out: Path, cfg: dict[str, Any]) -> Interrupted:
    """The one-line error of a run stopped by Ctrl-C or SIGTERM: what was kept, and how to go on."""
    kept = kept_checkpoint(out)
    given = cfg["resume"] not in ("", "auto") and kept.startswith("no checkpoint")
    error = Interrupted(f"{interrupt_name(e)} {where}: {kept}; continue with --resume "
                        f"{cfg['resume'] if given else 'auto'}")
    error.exit_code = interrupt_status(e)
    return error


def preempted_error(name: str, where: str, out: Path, note: str = "") -> Preempted:
    """The one-line error of a run preempted (by the signal `name`) where it saved no position: between epochs, or
    under `--fsdp`; it names the checkpoint kept and how to go on."""
    return Preempted(f"preempted ({name}) {where}: {kept_checkpoint(out)}{note}; continue with --resume auto")


def say_resume(cfg: dict[str, Any], out: Path, resume: Path | None, start_epoch: int,
               log: logging.Logger = logger) -> None:
    """One line: where the run resumes from, or that `--resume auto` found nothing and starts a new run."""
    if resume is not None:
        numbered = cfg["resume"] == "auto" and resume in numbered_checkpoints(out)
        done = f"epoch {start_epoch - 1} done" if start_epoch else "no epoch done"
        log.info("resuming from %s (%s) at epoch %d%s", resume, done, start_epoch,
                 f" (there is no {LAST}: the newest numbered checkpoint)" if numbered else "")
    elif cfg["resume"] == "auto":
        log.info("--resume auto: no checkpoint in %s, starting a new run", out)
