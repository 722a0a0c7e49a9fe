"""One fine-tuning epoch and one evaluation, as MAE's `engine_finetune.py`: per-iteration lr with layer scales,
Mixup, bf16 autocast on CUDA, gradient accumulation, optional gradient clipping; top-1 / top-5 by timm's
`accuracy`."""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
from timm.data import Mixup
from timm.utils import accuracy
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from ..distributed import all_reduce_mean, is_main_process
from ..training.engine import NonFiniteLossError, autocast, gradient_sync
from ..training.preempt import EpochPosition, StopRequested
from ..training.schedule import set_lr, warmup_cosine


def train_one_epoch(model: torch.nn.Module, criterion: torch.nn.Module, loader, optimizer: torch.optim.Optimizer,
                    device: torch.device, epoch: int, cfg: dict[str, Any], peak_lr: float, mixup: Mixup | None,
                    writer: SummaryWriter | None = None, position: EpochPosition | None = None,
                    stop: Callable[[], bool] | None = None) -> dict[str, float]:
    """One pass over `loader`; the optimizer steps every `accum_iter` iterations (a last, partial group is
    dropped, as MAE's loss scaler does: its losses are computed without gradients).

    `position` and `stop` as in pretraining (`pretrain.training.engine.train_one_epoch`): the epoch continues a
    stopped one (`loader` yields its rest; iteration count, loss sum and RNG states go on from there), and `stop`,
    asked at each optimizer step but the epoch's last, ends it early with `StopRequested`.

    Returns:
        {"loss": mean over processes, "lr": last lr, "epoch_time_s": wall time}

    Raises:
        NonFiniteLossError: the loss is not finite (the caller keeps the last checkpoint).
    """
    model.train()
    accum = cfg["accum_iter"]
    first = position.iteration if position is not None else 0
    n_iter = first + len(loader)
    last_step_end = n_iter // accum * accum  # iterations from here on belong to a dropped partial group
    loss_sum, lr, start = (position.loss_sum if position is not None else 0.0), 0.0, time.perf_counter()
    batches = iter(loader)  # draws the workers' seed from the epoch's fresh RNG, as an uninterrupted epoch does
    if position is not None:
        position.restore_rng()
    bar = tqdm(batches, total=n_iter, initial=first, desc=f"epoch {epoch}",
               disable=None if is_main_process() else True, dynamic_ncols=True, leave=False)
    optimizer.zero_grad(set_to_none=True)
    for it, (images, targets) in enumerate(bar, start=first):
        if it % accum == 0:
            lr = warmup_cosine(epoch + it / n_iter, cfg["warmup_epochs"], cfg["epochs"], peak_lr, cfg["min_lr"])
            set_lr(optimizer, lr)
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if mixup is not None:
            images, targets = mixup(images, targets)
        step, dropped = (it + 1) % accum == 0, it >= last_step_end
        # a dropped group's gradients would be cleared unused (FSDP2 would even keep them for the next step)
        with gradient_sync(model, step), torch.no_grad() if dropped else nullcontext():
            with autocast(device):
                loss = criterion(model(images), targets)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise NonFiniteLossError(f"loss is {loss_value} at epoch {epoch}, iteration {it}")
            if not dropped:
                (loss / accum).backward()
        if step:
            if cfg["clip_grad"] is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["clip_grad"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        loss_sum += loss_value
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
        if writer is not None and it % 10 == 0:
            writer.add_scalar("train/loss", loss_value, int((epoch + it / n_iter) * 1000))
            writer.add_scalar("train/lr", lr, int((epoch + it / n_iter) * 1000))
        if step and it + 1 < n_iter and stop is not None and stop():
            raise StopRequested(EpochPosition(epoch, it + 1, loss_sum=loss_sum))
    return {"loss": all_reduce_mean(loss_sum / max(n_iter, 1), device), "lr": lr,
            "epoch_time_s": time.perf_counter() - start}


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: torch.device, num_classes: int) -> dict[str, float]:
    """Top-1 and top-5 accuracy (in %, as MAE prints them) and the cross-entropy over every image of `loader`,
    summed over processes (each holding its own share of the split). Images of label -1 are padding and not
    counted: they give every process as many forwards, which FSDP2's collective forward needs.

    Top-5 is top-min(5, classes): with fewer than five classes every image counts as right.
    """
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # correct@1, correct@k, loss sum, images
    k = min(5, num_classes)
    for images, targets in tqdm(loader, desc="eval", disable=None if is_main_process() else True, leave=False):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast(device):
            output = model(images)
        keep = targets >= 0
        output, targets = output[keep].float(), targets[keep]
        n = targets.shape[0]
        if n == 0:
            continue
        acc1, acck = accuracy(output, targets, topk=(1, k))
        loss = torch.nn.functional.cross_entropy(output, targets, reduction="sum")
        sums += torch.tensor([acc1.item() * n / 100, acck.item() * n / 100, loss.item(), n], dtype=torch.float64,
                             device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    images = max(sums[3].item(), 1.0)
    return {"acc1": 100 * sums[0].item() / images, "acc5": 100 * sums[1].item() / images,
            "loss": sums[2].item() / images, "images": int(sums[3].item())}
