"""MAE vs CrossMAE training cost side by side, and the ViTDet backbone's attention kernels: the sweeps,
tables and plots of `tools/benchmark.py` (measurement primitives in `workflows.measure`).

Pretraining mode: for MAE and CrossMAE (each prediction ratio) at every input size of `--input-size` and
`--sweep`, fvcore encoder/decoder GFLOPs per image, the median training-step time (forward, backward, AdamW;
the variants interleaved step by step), peak memory (each variant in a fresh process) and every figure's ratio
to MAE; on CUDA also model FLOPs utilisation. Writes benchmark.md, benchmark.json and benchmark.png.
ViTDet mode (`--vitdet`): forward+backward time and peak memory of the ViT-B detection backbone with each
attention path (`attn_impl` sdpa, folded) against detectron2's explicit softmax ("eager"); writes vitdet.md and
vitdet.json.
"""
from __future__ import annotations

import datetime
import gc
import json
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from detection.vit import ATTN_IMPLS  # noqa: E402
from pretrain.distributed import resolve_device  # noqa: E402
from pretrain.errors import ConfigError  # noqa: E402
from pretrain.models import VIT_SIZES, list_models  # noqa: E402
from pretrain.training.optim import fused_by_default  # noqa: E402
from pretrain.analysis.figures import save_figure  # noqa: E402

from .reference import measure_reference, reference_table  # noqa: E402
from .measure import (PretrainWorkload, TrainStep, ViTDetWorkload, calibrate_memory,  # noqa: E402
                      median, peak_bf16_tflops, peak_memory, pretrain_flops, time_round_robin,
                      training_tflops)

DEFAULT_BATCH = {("pretrain", "cpu"): 8, ("pretrain", "cuda"): 128, ("vitdet", "cpu"): 1, ("vitdet", "cuda"): 2}


@dataclass
class BenchmarkConfig:
    """What `run` measures; the fields are `tools/benchmark.py`'s flags (see `workflows.cli.benchmark`)."""

    size: str = "base"
    input_size: int = 224
    patch_size: int | None = None
    batch_size: int | None = None  # None: DEFAULT_BATCH for the mode and device
    steps: int = 5
    warmup: int = 2
    mask_ratio: float = 0.75
    prediction_ratios: Sequence[float] = (0.25, 0.75)
    mae_decoder_depth: Sequence[int] = (8,)
    crossmae_decoder_depth: Sequence[int] = (12,)
    sweep: Sequence[int] = (224, 336, 448)
    no_memory: bool = False
    device: str = "auto"
    output: str = "output/benchmark"
    compile: bool = False
    fused_adamw: str = "auto"
    peak_tflops: float | None = None
    vitdet: bool = False
    vitdet_size: int = 1024
    reference: str | None = None  # a checkout of the official CrossMAE code (workflows.reference)
    cpu_bf16: bool = False  # with reference: also our step under bf16 autocast on CPU

    def __post_init__(self) -> None:
        if self.steps < 1 or self.warmup < 0:
            raise ConfigError(f"--steps must be >= 1 and --warmup >= 0, got {self.steps} and {self.warmup}")
        if self.size not in VIT_SIZES:
            raise ConfigError(f"--size {self.size} is none of {', '.join(VIT_SIZES)}")


def model_name(method: str, size: str) -> str:
    """The registered `method` model of `size` (its standard patch size)."""
    names = list_models(method, size)
    if not names:
        raise ConfigError(f"no registered {method} model of size {size}; known: {', '.join(list_models())}")
    return names[0]


def pretrain_workloads(cfg: BenchmarkConfig, input_size: int, patch_size: int) -> list[PretrainWorkload]:
    """MAE at each decoder depth (the first is the baseline), then CrossMAE at each depth and prediction ratio."""
    common = dict(input_size=input_size, patch_size=patch_size, batch_size=cfg.batch_size, mask_ratio=cfg.mask_ratio)
    out = [PretrainWorkload(f"MAE d={d}", model_name("mae", cfg.size), decoder_depth=d, **common)
           for d in cfg.mae_decoder_depth]
    out += [PretrainWorkload(f"CrossMAE p={r:g} d={d}", model_name("crossmae", cfg.size), decoder_depth=d,
                             prediction_ratio=r, **common)
            for d in cfg.crossmae_decoder_depth for r in cfg.prediction_ratios]
    return out


def _fused(cfg: BenchmarkConfig, device: torch.device) -> bool:
    return {"auto": fused_by_default(device), "on": True, "off": False}[cfg.fused_adamw]


def measure_pretrain(cfg: BenchmarkConfig, device: torch.device) -> list[dict[str, Any]]:
    """One row per (input size, variant), sizes ascending; ratios against the first MAE at the same size."""
    patch = cfg.patch_size or VIT_SIZES[cfg.size]["patch_size"]
    sizes = sorted({cfg.input_size, *cfg.sweep})
    bad = [s for s in sizes if s % patch]
    if bad:
        raise ConfigError(f"input sizes {bad} are not multiples of the patch size {patch}; pick multiples")
    fused = _fused(cfg, device)
    peak_tflops = cfg.peak_tflops or peak_bf16_tflops(device)
    rows = []
    for size in sizes:
        workloads = pretrain_workloads(cfg, size, patch)
        print(f"[{size}px] FLOPs ...", flush=True)
        flops = {w.label: pretrain_flops(w) for w in workloads}
        print(f"[{size}px] timing {len(workloads)} variants, {cfg.warmup} warm-up + {cfg.steps} steps each ...", flush=True)
        steps = {w.label: TrainStep(w, device, cfg.compile, fused) for w in workloads}
        times = time_round_robin(steps, cfg.warmup, cfg.steps, device)
        del steps
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        size_rows = []
        for w in workloads:
            mem = {"peak_mib": None, "step_mib": None}
            if not cfg.no_memory:
                print(f"[{size}px] peak memory of {w.label} ...", flush=True)
                mem = peak_memory(w, device, compile=cfg.compile, fused=fused)
            step_s = median(times[w.label])
            row = {"input_size": size, "patch_size": patch, "tokens": w.num_patches, "variant": w.label,
                   "method": "CrossMAE" if w.prediction_ratio is not None else "MAE",
                   "prediction_ratio": w.prediction_ratio if w.prediction_ratio is not None else cfg.mask_ratio,
                   "decoder_depth": w.decoder_depth, "batch_size": w.batch_size,
                   "encoder_gflops": flops[w.label]["encoder"], "decoder_gflops": flops[w.label]["decoder"],
                   "total_gflops": flops[w.label]["total"], "step_s": step_s, "step_times_s": times[w.label],
                   "images_per_s": w.batch_size / step_s, **mem}
            if peak_tflops:
                row["train_tflops"] = training_tflops(row["total_gflops"], row["images_per_s"])
                row["mfu"] = row["train_tflops"] / peak_tflops
            size_rows.append(row)
        base = size_rows[0]
        for row in size_rows:
            for key in ("decoder_gflops", "total_gflops", "step_s", "images_per_s", "peak_mib", "step_mib"):
                row[f"{key}_x_mae"] = row[key] / base[key] if base[key] else None
        rows += size_rows
    return rows


def _fmt(v: Any, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def pretrain_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of `measure_pretrain` rows; "xMAE" columns are variant / MAE at the same size."""
    cols = [("input", "input_size", "d"), ("L", "tokens", "d"), ("variant", "variant", "s"),
            ("enc GFLOPs", "encoder_gflops", ".4g"), ("dec GFLOPs", "decoder_gflops", ".4g"),
            ("dec xMAE", "decoder_gflops_x_mae", ".3f"), ("total GFLOPs", "total_gflops", ".4g"),
            ("total xMAE", "total_gflops_x_mae", ".3f"), ("step ms", "step_s", ".0f"),
            ("step xMAE", "step_s_x_mae", ".3f"), ("img/s", "images_per_s", ".2f"),
            ("img/s xMAE", "images_per_s_x_mae", ".3f"), ("peak MiB", "peak_mib", ".0f"),
            ("peak xMAE", "peak_mib_x_mae", ".3f"), ("step MiB", "step_mib", ".0f"),
            ("step MiB xMAE", "step_mib_x_mae", ".3f")]
    if any("mfu" in r for r in rows):
        cols += [("train TFLOP/s", "train_tflops", ".1f"), ("MFU", "mfu", ".1%")]
    lines = ["| " + " | ".join(c[0] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [_fmt(r[k] * 1e3 if k == "step_s" else r.get(k), f) for _, k, f in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pretrain_summary(rows: list[dict[str, Any]], input_size: int) -> str:
    """One line per CrossMAE variant at the main size: the paper's ratios, MAE over CrossMAE."""
    main = [r for r in rows if r["input_size"] == input_size]
    base = main[0]
    lines = []
    for r in main[1:]:
        if r["method"] != "CrossMAE":
            continue
        mem = "n/a" if r["peak_mib"] is None else f"{base['peak_mib'] / r['peak_mib']:.2f}"
        step_mem = "n/a" if not r["step_mib"] else f"{base['step_mib'] / r['step_mib']:.2f}"
        lines.append(f"- {base['variant']} / {r['variant']} at {input_size}px: decoder FLOPs "
                     f"{base['decoder_gflops'] / r['decoder_gflops']:.2f}, step time "
                     f"{base['step_s'] / r['step_s']:.2f}, peak memory {mem}, step memory {step_mem}")
    return "\n".join(lines)


def plot_pretrain(rows: list[dict[str, Any]], path: Path) -> None:
    """Total GFLOPs, step time per image and peak memory against sequence length, one line per variant."""
    panels = [("total_gflops", "forward GFLOPs / image"), ("ms_per_image", "train step ms / image"),
              ("peak_mib", "peak memory (MiB)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(12, 3.6))
    for label in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == label]
        x = [r["tokens"] for r in mine]
        for ax, (key, title) in zip(axes, panels):
            if key == "ms_per_image":
                y = [r["step_s"] * 1e3 / r["batch_size"] for r in mine]
            else:
                y = [r[key] for r in mine]
            if None not in y:
                ax.plot(x, y, marker="o", label=label)
    for ax, (_, title) in zip(axes, panels):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("patches per image L")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    save_figure(fig, path, dpi=80)


def measure_vitdet(cfg: BenchmarkConfig, device: torch.device) -> dict[str, Any]:
    """The ViTDet backbone's attention paths (`detection.vit.ATTN_IMPLS`: sdpa, eager = detectron2's explicit
    softmax, folded) against eager: output agreement, median fwd+bwd time of interleaved steps, peak memory."""
    if cfg.vitdet_size % 16:
        raise ConfigError(f"--vitdet-size {cfg.vitdet_size} is not a multiple of the patch size 16")
    workloads = [ViTDetWorkload(impl, impl, cfg.vitdet_size, cfg.batch_size) for impl in ATTN_IMPLS]
    steps = {w.label: TrainStep(w, device, cfg.compile) for w in workloads}
    with torch.no_grad():  # same seed, same weights: the kernels must agree (eval: no drop-path)
        outs = {w.attn_impl: steps[w.label].model.eval()(steps[w.label].x)["last_feat"].float() for w in workloads}
    for s in steps.values():
        s.model.train()
    max_diff = max((out - outs["eager"]).abs().max().item() for out in outs.values())
    print(f"timing {', '.join(ATTN_IMPLS)} at {cfg.vitdet_size}px, {cfg.warmup} warm-up + {cfg.steps} steps each ...",
          flush=True)
    times = time_round_robin(steps, cfg.warmup, cfg.steps, device)
    del steps, outs
    gc.collect()
    rows = []
    for w in workloads:
        mem = {"peak_mib": None, "step_mib": None}
        if not cfg.no_memory:
            print(f"peak memory of {w.label} ...", flush=True)
            mem = peak_memory(w, device, compile=cfg.compile)
        step_s = median(times[w.label])
        rows.append({"attn_impl": w.attn_impl, "img_size": w.img_size, "batch_size": w.batch_size, "step_s": step_s,
                     "step_times_s": times[w.label], "images_per_s": w.batch_size / step_s, **mem})
    eager = next(row for row in rows if row["attn_impl"] == "eager")
    for row in rows:
        for key in ("step_s", "peak_mib", "step_mib"):
            row[f"{key}_x_eager"] = row[key] / eager[key] if eager[key] else None
    return {"rows": rows, "max_abs_output_diff": max_diff}


def vitdet_table(result: dict[str, Any]) -> str:
    cols = [("attn_impl", "attn_impl", "s"), ("input", "img_size", "d"), ("fwd+bwd ms", "step_s", ".0f"),
            ("time x eager", "step_s_x_eager", ".3f"), ("img/s", "images_per_s", ".2f"),
            ("peak MiB", "peak_mib", ".0f"), ("peak x eager", "peak_mib_x_eager", ".3f"),
            ("step MiB", "step_mib", ".0f"), ("step MiB x eager", "step_mib_x_eager", ".3f")]
    lines = ["| " + " | ".join(c[0] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in result["rows"]:
        lines.append("| " + " | ".join(_fmt(r[k] * 1e3 if k == "step_s" else r[k], f) for _, k, f in cols) + " |")
    return "\n".join(lines)


def memory_check(device: torch.device, mib: int = 256) -> str:
    """One line on whether the memory probe reads a known allocation right on this machine."""
    seen = calibrate_memory(device, mib)
    ok = abs(seen - mib) <= 0.1 * mib
    return (f"- memory probe check: a {mib} MiB allocation in a fresh process reads as {seen:.0f} MiB"
            + ("" if ok else " — OFF BY MORE THAN 10%: the memory columns of this run are not trustworthy"))


def _header(title: str, cfg: BenchmarkConfig, command: str, device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    memory = ("CUDA allocator peak (max_memory_allocated, reset after the model is built)" if device.type == "cuda"
              else "peak RSS (VmHWM) of a fresh process per variant during its steps (peak reset via "
                   "/proc/self/clear_refs after the build); includes interpreter, torch and model")
    return "\n".join([
        f"# {title}", "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- command: `{command}`",
        f"- device: {name}; torch {torch.__version__}, {torch.get_num_threads()} threads",
        f"- batch {cfg.batch_size}; median of {cfg.steps} timed steps after {cfg.warmup} warm-up, "
        f"variants interleaved step by step; {'bf16 autocast' if device.type == 'cuda' else 'fp32'}; "
        f"torch.compile {'on' if cfg.compile else 'off'}",
        f"- memory: {memory}; \"step MiB\" = peak minus what was held before the first step",
        *([] if cfg.no_memory else [memory_check(device)]),
        ""])


def run(cfg: BenchmarkConfig, command: str = "") -> dict[str, Any]:
    """Measure as `cfg` says, write the table, JSON (and plot) under `cfg.output`, print the table.

    Args:
        cfg: what to measure.
        command: the command line, recorded in the report's header.

    Returns:
        {"rows": [...]} in pretraining mode; the ViTDet result dict with `cfg.vitdet`.
    """
    device = resolve_device(cfg.device)
    mode = "vitdet" if cfg.vitdet else "pretrain"
    if cfg.batch_size is None:
        cfg.batch_size = DEFAULT_BATCH[(mode, device.type)]
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.vitdet:
        result = measure_vitdet(cfg, device)
        text = (_header("ViTDet ViT-B backbone: attention paths against the explicit softmax (eager)", cfg, command,
                        device)
                + "\n" + vitdet_table(result) + "\n\n"
                + f"max |path - eager| of the backbone output over the paths (eval, same weights): "
                f"{result['max_abs_output_diff']:.2e}\n")
        (out / "vitdet.md").write_text(text)
        (out / "vitdet.json").write_text(json.dumps(result, indent=1))
        print(text)
        return result
    if cfg.reference:
        return _run_reference(cfg, device, out, command)
    rows = measure_pretrain(cfg, device)
    fused = _fused(cfg, device)
    text = (_header(f"MAE vs CrossMAE training cost, ViT-{cfg.size}", cfg, command, device)
            + f"- AdamW fused={fused}; mask ratio {cfg.mask_ratio}\n"
            + "- GFLOPs: fvcore, per image, one forward, one multiply-add = 1 FLOP; \"xMAE\" = variant / "
              "first MAE row at the same input size"
            + ("; train TFLOP/s = 3 x forward x 2 FLOPs per multiply-add x img/s, MFU = that / bf16 dense peak"
               if any("mfu" in r for r in rows) else "")
            + "\n\n" + pretrain_table(rows) + "\n\n" + pretrain_summary(rows, cfg.input_size) + "\n")
    (out / "benchmark.md").write_text(text)
    (out / "benchmark.json").write_text(json.dumps(rows, indent=1))
    plot_pretrain(rows, out / "benchmark.png")
    print(text)
    print(f"wrote {out / 'benchmark.md'}, {out / 'benchmark.json'}, {out / 'benchmark.png'}")
    return {"rows": rows}



def _run_reference(cfg: BenchmarkConfig, device: torch.device, out: Path, command: str) -> dict[str, Any]:
    """`--reference`: our steps against the official code's at `cfg.input_size`; writes reference.md / .json."""
    patch = cfg.patch_size or VIT_SIZES[cfg.size]["patch_size"]
    rows = measure_reference(cfg.reference, cfg.size, pretrain_workloads(cfg, cfg.input_size, patch), device,
                             cfg.warmup, cfg.steps, cfg.compile, _fused(cfg, device), cfg.cpu_bf16)
    text = (_header(f"Our training step against the official code's, ViT-{cfg.size}/{cfg.input_size}",
                    cfg, command, device)
            + "- speed x official = official median step / this row's (above 1: faster than the official code)\n\n"
            + reference_table(rows) + "\n")
    (out / "reference.md").write_text(text)
    (out / "reference.json").write_text(json.dumps(rows, indent=1))
    print(text)
    return {"rows": rows}
