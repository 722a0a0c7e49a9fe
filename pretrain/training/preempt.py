"""Preemption: a signal (SIGUSR1; under the SLURM launcher also SIGTERM) stops a run at the next optimizer step with
its position inside the epoch saved, and `--resume auto` continues from that very iteration.

What a stop saves, in `checkpoint-last.pth` beside the usual resume keys, under `"position"`: the epoch in progress,
the samples of its order already taken (over all processes), the next iteration, and per process the partial loss
sum, the count of unreadable images replaced, the divergence guard's recent losses and the RNG states (torch CPU,
CUDA, numpy, Python `random`). Its `"epoch"` is the last *finished* epoch, so a reader unaware of positions redoes
the epoch in progress.

Exact, i.e. the same losses and weights as an uninterrupted run, for the same world size, batch size and
`num_workers=0`. With DataLoader workers the masks still match but the augmentation of the epoch's rest differs
(the workers restart with fresh RNGs). At another world size (or batch size) the rest of the epoch's sample order is
dealt to the new processes (each remaining sample once, padded as `DistributedSampler` pads), the RNG streams are the
epoch's fresh ones, and the epoch's logged loss mixes the old processes' sums with the new ones.
"""
from __future__ import annotations

import logging
import math
import random
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from ..errors import UserError
from .checkpoint import LAST

logger = logging.getLogger("pretrain")
PREEMPT_SIGNALS: tuple[int, ...] = (signal.SIGUSR1,)  # a command line's; the SLURM launcher adds SIGTERM


class Preempted(UserError):
    """A run stopped by a preemption signal after saving its position; exit status 75 (EX_TEMPFAIL: run the same
    command again with `--resume auto`)."""

    exit_code = 75


@dataclass
class EpochPosition:
    """Where in an epoch a run stopped, as one process sees it (see the module docstring)."""

    epoch: int
    iteration: int  # the next iteration, numbered as in this run
    samples_done: int = 0  # of the epoch's sample order, over all processes
    loss_sum: float = 0.0
    skipped: int = 0
    loss_window: list[float] = field(default_factory=list)
    rng: dict[str, Any] | None = None  # None: not restored (another world size)

    def restore_rng(self) -> None:
        """Put this process's RNGs back where they were when the run stopped (nothing without saved states)."""
        if self.rng is not None:
            set_rng_states(self.rng)


class StopRequested(Exception):
    """Raised by the epoch loop at an optimizer step that every process agreed to stop at."""

    def __init__(self, position: EpochPosition) -> None:
        super().__init__(f"stop requested at epoch {position.epoch}, iteration {position.iteration}")
        self.position = position


class StopFlag:
    """Set by a preemption signal; `__call__` is the decision all processes share (a MAX all-reduce when
    distributed), asked at optimizer-step boundaries."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device or torch.device("cpu")
        self.signal: str | None = None

    def set(self, signum: int, _frame: object = None) -> None:
        self.signal = signal.Signals(signum).name

    def __call__(self) -> bool:
        if not dist.is_initialized():
            return self.signal is not None
        # the signal's number travels: every process names the signal one of them received
        number = torch.tensor([float(signal.Signals[self.signal]) if self.signal else 0.0], device=self.device)
        dist.all_reduce(number, op=dist.ReduceOp.MAX)
        if number.item() and self.signal is None:
            self.signal = signal.Signals(int(number.item())).name
        return bool(number.item())

    def name(self) -> str:
        """The signal as a message names it (received by this process or, learnt at the agreement, another)."""
        return self.signal or "signal to another process"


@contextmanager
def preemption(signals: Sequence[int] = PREEMPT_SIGNALS, device: torch.device | None = None) -> Iterator[StopFlag]:
    """Within the block, `signals` set the yielded flag instead of their previous handling, which is restored on
    the way out (handlers can only be set from the main thread: elsewhere the flag is never set)."""
    flag = StopFlag(device)
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {s: signal.signal(s, flag.set) for s in signals}
    try:
        yield flag
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def rng_states() -> dict[str, Any]:
    """This process's RNG states as tensors and plain lists, so that `torch.load(weights_only=True)` reads them."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                      "gauss": float(gauss)},
            "python": [version, list(internal), gauss_next]}


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what `rng_states` returned (CUDA states only where as many devices are visible)."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    n = states["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))


def gather_position(stopped: EpochPosition, resumed: EpochPosition | None, batch_size: int, window: Sequence[float],
                    rank: int, world: int) -> dict[str, Any] | None:
    """Every process's part of a stop (`stopped`, with this process's divergence-guard `window` and RNG states),
    gathered on the main process as the checkpoint's `"position"`; None on the others.

    `resumed` is where this epoch began in this run (None: at its start): samples taken before it count as done.
    """
    before = resumed.samples_done if resumed is not None else 0
    first = resumed.iteration if resumed is not None else 0
    mine = {"loss_sum": stopped.loss_sum, "skipped": stopped.skipped, "loss_window": [float(x) for x in window],
            "rng": rng_states()}
    parts = [mine]
    if world > 1:
        parts = [None] * world if rank == 0 else None
        dist.gather_object(mine, parts, dst=0)
    if rank != 0:
        return None
    return {"epoch": stopped.epoch, "iteration": stopped.iteration, "world_size": world, "batch_size": batch_size,
            "samples_done": before + (stopped.iteration - first) * batch_size * world, "ranks": parts}


def save_position(e: StopRequested, resumed: EpochPosition | None, stop: StopFlag, batch_size: int,
                  state: dict[str, Any], out: Path, save: Callable[[dict, Path], None], rank: int,
                  world: int) -> Preempted:
    """Every process's position gathered into `state` (the resume checkpoint of the last finished epoch's kind, made
    now; its `loss_window` is the divergence guard's, where the trainer has one) and saved by the main process as
    `out/checkpoint-last.pth` through `save`; returns the one-line error that says where the run stopped and how to
    go on."""
    position = gather_position(e.position, resumed, batch_size, state.get("loss_window", ()), rank, world)
    if position is not None:
        save({**state, "position": position}, out / LAST)
    if world > 1:
        dist.barrier()  # no process exits (and ends the process group) before the main one has saved
    return Preempted(f"preempted ({stop.name()}) in epoch {e.position.epoch} before iteration {e.position.iteration}: "
                     f"saved {out / LAST}; continue with --resume auto")


def position_for(saved: dict[str, Any] | None, rank: int, world: int, batch_size: int,
                 accum: int = 1, log: logging.Logger = logger) -> EpochPosition | None:
    """This process's `EpochPosition` from a checkpoint's `"position"` (None for a checkpoint written at an epoch's
    end), said in one line to `log`. At the saved world and batch size each process takes its own part back;
    otherwise the first process carries the old loss sums and counts, and the iteration numbers the samples done in
    the new iterations, rounded down to the start of an accumulation group of `accum`, where the schedule and the
    optimizer steps line up."""
    if not saved:
        return None
    parts, done = saved["ranks"], int(saved["samples_done"])
    if rank == 0:
        log.info("continuing epoch %d after %d samples (iteration %d of %d process(es) of batch %d)",
                 saved["epoch"], done, saved["iteration"], saved["world_size"], saved["batch_size"])
    if saved["world_size"] == world and saved["batch_size"] == batch_size:
        mine = parts[rank]
        return EpochPosition(saved["epoch"], int(saved["iteration"]), done, float(mine["loss_sum"]),
                             int(mine["skipped"]), list(mine["loss_window"]), mine["rng"])
    first = rank == 0
    return EpochPosition(saved["epoch"], done // (batch_size * world) // accum * accum, done,
                         sum(float(p["loss_sum"]) for p in parts) if first else 0.0,
                         sum(int(p["skipped"]) for p in parts) if first else 0, list(parts[0]["loss_window"]))


class ResumableSampler(DistributedSampler):
    """`DistributedSampler` whose epoch can start after the first `done` samples of its order, taken before a stop
    by however many processes: each process gets its share of the rest, no sample of it twice (beyond the padding
    to equal shares that `DistributedSampler` also adds). `done` 0 is `DistributedSampler` itself."""

    done = 0

    def set_epoch(self, epoch: int, done: int = 0) -> None:
        super().set_epoch(epoch)
        self.done = done

    def _rest(self) -> list[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        n = len(self.dataset)
        order = torch.randperm(n, generator=g).tolist() if self.shuffle else list(range(n))
        order = (order * math.ceil(self.total_size / n))[:self.total_size][self.done:]
        share = math.ceil(len(order) / self.num_replicas)
        return (order * self.num_replicas)[:share * self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        if not self.done:
            return super().__iter__()
        return iter(self._rest()[self.rank::self.num_replicas])

    def __len__(self) -> int:
        return super().__len__() if not self.done else len(self._rest()) // self.num_replicas
