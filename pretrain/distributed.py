"""Devices and torchrun / DDP set-up: nccl on CUDA, gloo on CPU; rank 0 owns logs and checkpoints."""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from .errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when visible, else cpu; "cpu", "cuda", "cuda:N" as given.

    Raises:
        ConfigError: a CUDA device is asked for but none is visible, or the name is no device.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} requested but no CUDA device is visible; use --device cpu")
    return device


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the process group torchrun describes in the environment; no-op for a single process.

    Returns:
        (rank, world_size)
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def launch_rank() -> int:
    """This process's rank as torchrun set it (0 without torchrun), known before the process group forms."""
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def all_reduce_mean(value: float, device: torch.device) -> float:
    """Mean of a scalar over processes (the value itself when not distributed)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).item()


def cleanup() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@contextmanager
def distributed_session(device: torch.device) -> Iterator[tuple[int, int]]:
    """`init_distributed` for the duration of a `with` block (a no-op without torchrun); yields (rank, world)."""
    rank_world = init_distributed(device)
    try:
        yield rank_world
    finally:
        cleanup()
