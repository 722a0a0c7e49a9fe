"""Measuring training-step cost: workloads, interleaved step timing, peak memory in a fresh process, FLOPs.

A workload (a pretraining model at one setting, or the ViTDet backbone with one attention kernel) is a small
picklable spec, so its peak memory can be measured in a fresh process: a process's peak RSS never goes down,
and a CUDA allocator peak is cleanest with nothing else resident. `calibrate_memory` checks the instrument
itself on the machine at hand: a known allocation must read as its size.
"""
from __future__ import annotations

import concurrent.futures
import gc
import multiprocessing
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn

from detection.vit import ViT
from pretrain.models import create_model
from pretrain.training.config import DEFAULTS
from pretrain.training.engine import autocast
from pretrain.evaluation.flops import count_flops
from pretrain.training.optim import build_optimizer, fused_by_default

# bf16 dense tensor-core peaks (TFLOP/s, no sparsity), from the vendors' data sheets
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


@dataclass(frozen=True)
class PretrainWorkload:
    """One MAE / CrossMAE training setting.

    Attributes:
        label: row name in tables, e.g. "CrossMAE p=0.25 d=12".
        model: registered model name (`pretrain.models.list_models()`).
        input_size: image side in pixels.
        patch_size: patch side in pixels.
        batch_size: images per step.
        decoder_depth: decoder blocks.
        mask_ratio: fraction of patches hidden from the encoder.
        prediction_ratio: CrossMAE's fraction of all patches reconstructed; None for MAE.
    """

    label: str
    model: str
    input_size: int
    patch_size: int
    batch_size: int
    decoder_depth: int
    mask_ratio: float = 0.75
    prediction_ratio: float | None = None

    uses_optimizer = True

    @property
    def num_patches(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    def build(self) -> nn.Module:
        cfg = {"model": self.model, "model_kwargs": {"patch_size": self.patch_size},
               "input_size": self.input_size, "norm_pix_loss": True, "mask_ratio": self.mask_ratio,
               "decoder_depth": self.decoder_depth, "prediction_ratio": self.prediction_ratio}
        return create_model(cfg)

    def inputs(self, device: torch.device) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        return torch.randn(self.batch_size, 3, self.input_size, self.input_size, generator=g).to(device)

    def loss(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model(x).loss


@dataclass(frozen=True)
class ViTDetWorkload:
    """The ViTDet ViT-B backbone (window 14, global blocks 2, 5, 8, 11, relative position on).

    Attributes:
        label: row name in tables.
        attn_impl: "sdpa" (relative position as an additive mask) or "eager" (explicit softmax).
        img_size: input side in pixels (1024 in ViTDet).
        batch_size: images per step.
    """

    label: str
    attn_impl: str
    img_size: int = 1024
    batch_size: int = 1

    uses_optimizer = False

    def build(self) -> nn.Module:
        # the backbone of detectron2's projects/ViTDet/configs/COCO/mask_rcnn_vitdet_b_100ep.py
        return ViT(img_size=self.img_size, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                   drop_path_rate=0.1, window_size=14, mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                   window_block_indexes=(0, 1, 3, 4, 6, 7, 9, 10), residual_block_indexes=(),
                   use_rel_pos=True, out_feature="last_feat", attn_impl=self.attn_impl)

    def inputs(self, device: torch.device) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        return torch.randn(self.batch_size, 3, self.img_size, self.img_size, generator=g).to(device)

    def loss(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model(x)["last_feat"].float().square().mean()


Workload = PretrainWorkload | ViTDetWorkload


class TrainStep:
    """One training step of a workload: forward (bf16 autocast on CUDA, as the trainer), backward,
    and, for pretraining, an AdamW step with the trainer's parameter groups.

    Args:
        workload: what to build and run; built under seed 0, so equal settings give equal weights.
        device: where to run.
        compile: wrap the model in `torch.compile`.
        fused: fused AdamW; None picks `fused_by_default(device)`.
        cpu_bf16: bf16 autocast on CPU too (the trainer's `--cpu_bf16`).
    """

    def __init__(self, workload: Workload, device: torch.device, compile: bool = False,
                 fused: bool | None = None, cpu_bf16: bool = False) -> None:
        torch.manual_seed(0)
        self.workload = workload
        self.device = device
        self.cpu_bf16 = cpu_bf16
        self.model = workload.build().to(device).train()
        self.forward = torch.compile(self.model) if compile else self.model
        self.x = workload.inputs(device)
        self.optimizer = None
        if workload.uses_optimizer:
            fused = fused_by_default(device) if fused is None else fused
            # the trainer's optimizer and groups; the lr value does not change the step's cost
            self.optimizer = build_optimizer(self.model, DEFAULTS["blr"], DEFAULTS["weight_decay"], fused=fused)

    def __call__(self) -> None:
        with autocast(self.device, self.cpu_bf16):
            loss = self.workload.loss(self.forward, self.x)
        loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.model.zero_grad(set_to_none=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_round_robin(steps: dict[str, Callable[[], None]], warmup: int, n: int,
                     device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each step, the steps interleaved one call at a time.

    Interleaving makes a change in machine load hit every step alike; the starting step rotates
    each round so none always runs right after the same neighbour.

    Args:
        steps: name -> callable running one step.
        warmup: untimed rounds first.
        n: timed rounds.
        device: synchronised around every timed call when CUDA.

    Returns:
        name -> n durations in seconds.
    """
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(n):
        for name in names[r % len(names):] + names[:r % len(names)]:
            synchronize(device)
            t0 = time.perf_counter()
            steps[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - t0)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def pretrain_flops(workload: PretrainWorkload) -> dict[str, float]:
    """fvcore GFLOPs per image (one multiply-add = one FLOP) of one forward, split encoder / decoder."""
    torch.manual_seed(0)
    model = workload.build()
    imgs = workload.inputs(torch.device("cpu"))[:1]
    return count_flops(model, imgs)


def _peak_memory_child(workload: Workload, device: str, steps: int, num_threads: int, compile: bool,
                       fused: bool | None) -> dict[str, float]:
    torch.set_num_threads(num_threads)
    dev = torch.device(device)
    step = TrainStep(workload, dev, compile, fused)
    mib = 2.0**20
    if dev.type == "cuda":
        synchronize(dev)
        before = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        for _ in range(steps):
            step()
        synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
    else:
        gc.collect()
        before = _reset_peak_rss()
        for _ in range(steps):
            step()
        peak = _peak_rss()
    return {"peak_mib": peak / mib, "step_mib": (peak - before) / mib}


def _proc_status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return None


def _peak_rss() -> int:
    """Peak RSS in bytes of this process's own address space.

    Linux's VmHWM rather than `ru_maxrss`: a spawned child's `ru_maxrss` also covers the address space
    it was forked with before exec, i.e. the parent's RSS, which would hide the child's own peak.
    """
    hwm = _proc_status_bytes("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _reset_peak_rss() -> int:
    """Bytes resident now, with the peak RSS reset to it, so that the peak read afterwards is that of
    what follows; importing torch and building the model leave a transient peak above what a step needs.
    Where /proc/self/clear_refs is not writable (not Linux >= 4.0), the peak so far instead."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: reset the peak RSS (VmHWM) to the current RSS
    except OSError:
        return _peak_rss()
    rss = _proc_status_bytes("VmRSS")
    return rss if rss is not None else _peak_rss()


def peak_memory(workload: Workload, device: torch.device, steps: int = 2, compile: bool = False,
                fused: bool | None = None) -> dict[str, float]:
    """Peak memory of `steps` training steps, measured in a fresh spawned process.

    On CUDA the allocator peak (`torch.cuda.max_memory_allocated`, reset once the model and batch
    are resident); on CPU the process's peak RSS during the steps (VmHWM, `ru_maxrss` off Linux),
    which includes the interpreter, torch and the model.

    Returns:
        {"peak_mib": peak, "step_mib": peak minus what was held before the first step}.
    """
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(_peak_memory_child, workload, str(device), steps, torch.get_num_threads(),
                           compile, fused).result()


def peak_bf16_tflops(device: torch.device) -> float | None:
    """The dense bf16 peak of a known CUDA device, else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def training_tflops(forward_gflops_fma: float, images_per_s: float) -> float:
    """Achieved training TFLOP/s: 3 x forward (backward ~ 2 x forward) x 2 FLOPs per multiply-add."""
    return 3 * 2 * forward_gflops_fma * images_per_s / 1e3




def _allocation_child(device: str, mib: int) -> float:
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        before = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        block = torch.ones(mib * 2**18, device=dev)  # 4-byte floats
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
    else:
        gc.collect()
        before = _reset_peak_rss()
        block = torch.ones(mib * 2**18)
        peak = _peak_rss()
    del block
    return (peak - before) / 2**20


def calibrate_memory(device: torch.device, mib: int = 256) -> float:
    """What the memory probe reads for an allocation of exactly `mib` MiB in a fresh process (MiB)."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(_allocation_child, str(device), mib).result()
