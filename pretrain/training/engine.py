"""One pretraining epoch: per-iteration lr, bf16 autocast on CUDA, accumulation, NaN guard."""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from ..distributed import all_reduce_mean, is_main_process
from .preempt import EpochPosition, StopRequested
from .schedule import lr_at, set_lr


class NonFiniteLossError(RuntimeError):
    """The loss became non-finite, or jumped far above its recent values (a divergence)."""


class SpikeGuard:
    """Flags an absurd loss: one over `factor` x the median of the last `window` losses, a diverging run's mark.

    The median counts as at least `floor` while fewer than `warm` losses are known: an untrained model's loss on
    normalised pixels is about 1, so a few small early losses (batches of flat images) cannot make ordinary ones
    look like spikes. A new run's first loss, taken before any update, is the first reference; a resumed run gets
    its losses back from the checkpoint (`recent`), so the guard holds from its first iteration. `factor` 0 turns
    it off (the caller stops non-finite losses regardless).
    """

    def __init__(self, factor: float, recent: Sequence[float] = (), window: int = 50, warm: int = 20,
                 floor: float = 1.0) -> None:
        self.factor, self.window, self.warm, self.floor = factor, window, warm, floor
        self.recent = [float(x) for x in recent if math.isfinite(x)][-window:]

    def __call__(self, loss: float) -> str | None:
        """None for an ordinary loss (which joins the window); else why it is a spike."""
        if self.factor and self.recent:
            median = sorted(self.recent)[len(self.recent) // 2]
            floored = len(self.recent) < self.warm and median < self.floor
            if loss > self.factor * (self.floor if floored else median):
                reference = (f"{self.floor:g}, the least a median of fewer than {self.warm} losses counts as"
                             if floored else f"{median:.4g}, the median of the last {len(self.recent)} loss"
                             + ("es" if len(self.recent) > 1 else ""))
                return f"loss {loss:.4g} is over {self.factor:g} x {reference}"
        self.recent = (self.recent + [loss])[-self.window:]
        return None


def autocast(device: torch.device, cpu_bf16: bool = False) -> torch.autocast:
    """The precision policy of every training step: bf16 autocast on CUDA; fp32 on CPU unless `cpu_bf16` (bf16
    autocast there too: faster on CPUs with bf16 matrix instructions, docs/results/benchmark_cpu.md)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" or cpu_bf16)


def optimizer_steps_per_epoch(n_iter: int, accum_iter: int, step_partial_accum: bool) -> int:
    """Optimizer steps in an epoch of `n_iter` iterations accumulated in groups of `accum_iter`.

    The official MAE / CrossMAE trainers step only when `(it + 1) % accum_iter == 0`, so a last, partial group
    is dropped (its gradients are cleared at the next epoch's start); `step_partial_accum` steps on it too.
    """
    return -(-n_iter // accum_iter) if step_partial_accum else n_iter // accum_iter


def gradient_sync(model: torch.nn.Module, boundary: bool) -> AbstractContextManager:
    """The context of one iteration's backward under gradient accumulation: the gradients are reduced over the
    processes (DDP's all-reduce, FSDP2's reduce-scatter) only on the iteration where the optimizer steps."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(boundary)
    return nullcontext() if boundary or not hasattr(model, "no_sync") else model.no_sync()


def _forward_backward(model: torch.nn.Module, imgs: torch.Tensor, scaler: torch.amp.GradScaler, device: torch.device,
                      accum: int, boundary: bool, dropped: bool, spike: SpikeGuard, where: str,
                      cpu_bf16: bool = False) -> float:
    """One iteration's loss, and its gradient (divided by `accum`) unless its accumulation group is `dropped`.

    Raises:
        NonFiniteLossError: the loss is not finite, or a spike (`where` says at which epoch and iteration).
    """
    sync = gradient_sync(model, boundary)
    # a dropped group's gradients would be discarded: its losses are computed without them
    with sync, torch.no_grad() if dropped else nullcontext():
        with autocast(device, cpu_bf16):
            loss = model(imgs).loss
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise NonFiniteLossError(f"loss is {loss_value} at {where}")
        jump = spike(loss_value)
        if jump:
            raise NonFiniteLossError(f"{jump} at {where}")
        if not dropped:
            scaler.scale(loss / accum).backward()
    return loss_value


def _progress(loader, position: EpochPosition | None, epoch: int, first: int, n_iter: int) -> tqdm:
    """The epoch's batches (from iteration `first` on) under a progress bar, with a stopped epoch's RNG states back."""
    batches = iter(loader)  # draws the workers' seed from the epoch's fresh RNG, as an uninterrupted epoch does
    if position is not None:
        position.restore_rng()
    # disable=None: no bar when stderr is not a terminal (a log file), so nothing redraws into files
    return tqdm(batches, total=n_iter, initial=first, desc=f"epoch {epoch}",
                disable=None if is_main_process() else True, dynamic_ncols=True, leave=False)


def _log_scalars(writer: SummaryWriter, loss: float, lr: float, epochs: float) -> None:
    # x-axis in 1/1000 epochs, as MAE, so curves of different batch sizes line up
    writer.add_scalar("train/loss", loss, int(epochs * 1000))
    writer.add_scalar("train/lr", lr, int(epochs * 1000))


def train_one_epoch(model: torch.nn.Module, loader, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, device: torch.device, epoch: int, cfg: dict[str, Any],
                    peak_lr: float, writer: SummaryWriter | None = None,
                    spike: SpikeGuard | None = None, position: EpochPosition | None = None,
                    stop: Callable[[], bool] | None = None) -> dict[str, float]:
    """Train for one pass over `loader`; `spike` (kept across epochs by the caller) stops a diverging run.

    `position`: the epoch continues a stopped one (`pretrain.training.preempt`): `loader` yields only the rest of
    it, and the iteration count, loss sum and RNG states go on from there. `stop`, asked at each optimizer step but
    an epoch's last, ends the epoch early by raising `StopRequested` with the position reached.

    Gradients are accumulated over `cfg["accum_iter"]` iterations per optimizer step. A last group shorter than
    that is dropped, as in the official trainers: its losses are computed and logged, its gradients never
    applied; with `cfg["step_partial_accum"]` it is stepped on instead (its gradient then sums fewer losses,
    each still divided by `accum_iter`).

    Returns:
        {"loss": mean loss over processes, "lr": last lr, "skipped_images": unreadable files replaced,
         "images_per_s": throughput of this process, "epoch_time_s": wall time}
    """
    model.train()
    accum = cfg["accum_iter"]
    first = position.iteration if position is not None else 0
    n_iter = first + len(loader)
    # iterations from `last_step_end` on belong to a partial group that is dropped
    last_step_end = min(n_iter, optimizer_steps_per_epoch(n_iter, accum, cfg.get("step_partial_accum", False)) * accum)
    loss_sum, skipped, seen = (position.loss_sum, position.skipped, 0) if position is not None else (0.0, 0, 0)
    lr = optimizer.param_groups[0]["lr"]
    start = time.perf_counter()
    spike = spike or SpikeGuard(0.0)
    bar = _progress(loader, position, epoch, first, n_iter)
    optimizer.zero_grad(set_to_none=True)
    for it, (imgs, n_skipped) in enumerate(bar, start=first):
        if it % accum == 0:
            lr = lr_at(epoch + it / n_iter, cfg, peak_lr)
            set_lr(optimizer, lr)
        imgs = imgs.to(device, non_blocking=True)
        boundary = (it + 1) % accum == 0 or it + 1 == last_step_end
        loss_value = _forward_backward(model, imgs, scaler, device, accum, boundary, it >= last_step_end, spike,
                                       f"epoch {epoch}, iteration {it}", cfg.get("cpu_bf16", False))
        if boundary:
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        loss_sum += loss_value
        skipped += int(n_skipped.sum())
        seen += imgs.shape[0]
        rate = seen / (time.perf_counter() - start)
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}")
        if writer is not None and it % cfg["log_every"] == 0:
            _log_scalars(writer, loss_value, lr, epoch + it / n_iter)
        if boundary and it + 1 < n_iter and stop is not None and stop():
            raise StopRequested(EpochPosition(epoch, it + 1, loss_sum=loss_sum, skipped=skipped))
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {"loss": all_reduce_mean(loss_sum / max(n_iter, 1), device), "lr": lr, "skipped_images": skipped,
            "images_per_s": seen / elapsed, "epoch_time_s": elapsed}
