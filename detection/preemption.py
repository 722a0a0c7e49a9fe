"""Preemption of a detectron2 training run: a signal asks the run to stop, the run finishes the iteration it is in,
saves a resume checkpoint through the trainer's own checkpointer and stops with a one-line message.

SIGUSR1 (a cluster's warning before preemption or a time limit, e.g. SLURM's `--signal=USR1@120`) always does this;
SIGTERM does it too when the run is a SLURM job (`SLURM_JOB_ID` set), since SLURM sends it before killing a job.
Every rank checks the request at the same iteration boundary (an all-reduce of the flag), so all ranks stop after
the same iteration and the checkpoint is the one `--resume` reads (`model_XXXXXXX.pth`, named in `last_checkpoint`).
Under SLURM, a SIGUSR1 also requeues the job (`scontrol requeue`), as submitit does.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from detectron2.engine import HookBase
from detectron2.utils import comm

from pretrain.training.preempt import Preempted

__all__ = ["Preempted", "PreemptionHook", "forward_stop_signals", "stop_signals", "train_preemptible"]

logger = logging.getLogger("detectron2")


class _Stop(BaseException):
    """Raised by `PreemptionHook` to leave detectron2's loop: not an `Exception`, which the loop would log with a
    traceback; `train_preemptible` turns it into `Preempted`."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


def stop_signals() -> tuple[signal.Signals, ...]:
    """The signals that preempt a run: SIGUSR1, and SIGTERM inside a SLURM job."""
    return (signal.SIGUSR1, signal.SIGTERM) if os.environ.get("SLURM_JOB_ID") else (signal.SIGUSR1,)


@contextmanager
def forward_stop_signals() -> Iterator[None]:
    """Within the block, pass the stop signals this process receives on to its child processes (the workers of
    detectron2's `launch`), which stop at an iteration boundary; this process waits for them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def forward(signum: int, _: Any) -> None:
        for child in multiprocessing.active_children():
            os.kill(child.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in stop_signals()}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _requeue() -> str:
    """Requeue this SLURM job; what happened, for the stop message."""
    job = os.environ["SLURM_JOB_ID"]
    if shutil.which("scontrol") is None:
        return f"; scontrol not found, so SLURM job {job} was not requeued"
    done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()
        return f"; scontrol requeue {job} failed ({said[-1] if said else f'exit status {done.returncode}'})"
    return f"; SLURM job {job} requeued"


class PreemptionHook(HookBase):
    """Stop training at the iteration boundary after a stop signal, with a checkpoint that `--resume` continues.

    Register it on every rank (all take part in the agreement), after the LR scheduler hook (the checkpoint then
    holds the schedule stepped past the finished iteration) and before `PeriodicWriter` (whose `after_train` then
    logs the stopped iteration once; detectron2 0.6's ETA divides by zero when one iteration is written twice).

    Args:
        checkpointer: the trainer's `DetectionCheckpointer` (it writes on the main process only).
    """

    def __init__(self, checkpointer: Any) -> None:
        self.checkpointer = checkpointer
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def _request(self, signum: int, _: Any) -> None:
        self.signum = self.signum or signum

    def before_train(self) -> None:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._previous = {sig: signal.signal(sig, self._request) for sig in stop_signals()}

    def after_train(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _agreed(self) -> int:
        """The stop signal any rank has seen (0 for none), the same on every rank."""
        if comm.get_world_size() == 1:
            return self.signum
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([self.signum], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def after_step(self) -> None:
        if self.trainer.iter + 1 >= self.trainer.max_iter:  # the last iteration: the run ends and evaluates anyway
            return
        signum = self._agreed()
        if not signum:
            return
        iteration = self.trainer.iter
        name = f"model_{iteration:07d}"
        path = Path(self.checkpointer.save_dir) / f"{name}.pth"
        if not (path.is_file() and Path(self.checkpointer.get_checkpoint_file() or "") == path):
            self.checkpointer.save(name, iteration=iteration)  # unless the periodic checkpoint of this very iteration
        message = (f"preempted ({signal.Signals(signum).name}) after iteration {iteration}: saved {path}; "
                   "continue with the same command plus --resume")
        if comm.is_main_process() and signum == signal.SIGUSR1 and os.environ.get("SLURM_JOB_ID"):
            message += _requeue()
        if comm.is_main_process():
            logger.warning(message)  # into log.txt as well as the command's error line
        comm.synchronize()  # no rank leaves before the checkpoint is written
        raise _Stop(message, signum)


def train_preemptible(trainer: Any, start_iter: int, max_iter: int) -> None:
    """`trainer.train(start_iter, max_iter)`, raising `Preempted` when a `PreemptionHook` stopped it.

    Raises:
        Preempted: a stop signal arrived; the message names the checkpoint and how to continue.
    """
    try:
        trainer.train(start_iter, max_iter)
    except _Stop as stop:
        raise Preempted(str(stop)) from None
