"""The five steps of the GPU check, each a function from the shared `Check` to a one-line summary and its details."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pretrain.training.run_folder import read_log

from .check import ROOT, Check, CheckConfig, StepFailed, StepSkipped, StepTimedOut

MIN_DEMO_S = 60  # the demo is skipped with less than this left
# The CrossMAE paper, ViT-B on 2 x A100: CrossMAE 1.48x faster per epoch than MAE, at 0.54x its memory.
PAPER_SPEEDUP, PAPER_MEMORY = 1.48, 0.54
RESUME_RTOL = 1e-3  # bf16 CUDA kernels need not be bitwise deterministic; on CPU the losses are equal
# --fsdp against DDP: on CUDA FSDP2 holds bf16 parameters where DDP autocasts fp32 ones; on CPU both are fp32
FSDP_RTOL = {"cuda": 0.05, "cpu": 1e-4}
# Pretraining runs: (GPU, --tiny). Two epochs of 4 iterations each.
PRETRAIN = {
    False: dict(input_size=224, batch_size=64, builtin_size=256, num_workers=4, size="base"),
    True: dict(input_size=32, batch_size=4, builtin_size=16, num_workers=0, size="tiny",
               model_kwargs={"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "decoder_embed_dim": 32,
                             "decoder_num_heads": 2}, decoder_depth=2),
}


# ------------------------------------------------------------------------------------------------------ 1. stack

# Run in a child, whose path holds the temporary site: the versions and the one-line environment check.
_STACK_PROBE = """
import importlib.metadata as md, json, torch
from workflows.environment import check_environment
names = ("torch", "torchvision", "timm", "detectron2", "fvcore", "iopath", "pycocotools", "omegaconf", "hydra-core",
         "shapely", "numpy", "opencv-python-headless", "matplotlib", "tensorboard", "safetensors", "setuptools")
def version(n):
    try:
        return md.version(n)
    except md.PackageNotFoundError:
        return None
info = {"versions": {n: version(n) for n in names}, "environment": check_environment(),
        "cuda_available": torch.cuda.is_available(), "cuda": torch.version.cuda,
        "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "bf16_supported": torch.cuda.is_available() and torch.cuda.is_bf16_supported()}
print("STACK " + json.dumps(info))
"""


def wheel_folder(cfg: CheckConfig) -> Path | None:
    """The carried wheel folder: --wheels, else `.whl` of the working tree where it exists; None for none."""
    if cfg.wheels == "":
        return None
    folder = Path(cfg.wheels) if cfg.wheels else ROOT / ".whl"
    if cfg.wheels and not folder.is_dir():
        raise StepFailed(f"--wheels {folder} is no folder; build one with tools/gpu_wheels.sh")
    return folder if folder.is_dir() else None


def step_stack(check: Check) -> tuple[str, dict[str, Any]]:
    folder = wheel_folder(check.cfg)
    details: dict[str, Any] = {"wheel_folder": str(folder) if folder else None}
    if folder:
        wheels = sorted(folder.glob("*.whl"))
        sdists = sorted(folder.glob("pb1-detectron2-*.tar.gz"))
        check.site = Path(tempfile.mkdtemp(prefix="gpu_check_site_"))
        if wheels:
            check.python("-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
                         "--disable-pip-version-check", "--target", check.site, *wheels)
        for sdist in sdists:
            check.python(ROOT / "tools" / "install_d2_sdist.py", sdist, check.site)
        check.env["PYTHONPATH"] = os.pathsep.join([str(check.site), check.env["PYTHONPATH"]])
        details["installed"] = [p.name for p in wheels + sdists]
    text = check.python("-c", _STACK_PROBE)
    info = json.loads(next(line for line in text.splitlines() if line.startswith("STACK "))[6:])
    details.update(info)
    pinned = _pinned("torch")
    found = info["versions"]["torch"]
    details["torch_pinned"] = pinned
    print(f"  {info['environment']}", flush=True)
    print("  " + ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v), flush=True)
    if check.cfg.device.startswith("cuda") and not info["cuda_available"]:
        raise StepFailed(f"--device {check.cfg.device} but torch {found} sees no CUDA device")
    installed = f"{len(details['installed'])} carried packages installed; " if folder else "no wheel folder; "
    torch_line = f"torch {found}" + ("" if found and pinned and found.split("+")[0] == pinned else
                                     f" (requirements.txt pins {pinned}: the check runs against the one found)")
    device = info["device_name"] or "CPU"
    return f"{installed}{torch_line}; {device}; {info['environment']}", details


def _pinned(name: str) -> str | None:
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if line.lower().startswith(f"{name}=="):
            return line.split("==", 1)[1].strip()
    return None


# --------------------------------------------------------------------------------------------------- 2. pretrain

def _pretrain_recipe(check: Check, method: str) -> Path:
    spec = dict(PRETRAIN[check.cfg.tiny])
    size = spec.pop("size")
    recipe = {"model": f"{method}_vit_{size}_patch16", "epochs": 2, "warmup_epochs": 1, "blr": 1.5e-4,
              "data_path": "builtin", "cache_images": True, "device": check.cfg.device, "seed": 0,
              "save_every": 1, "vis_every": 2, "log_every": 1, "prediction_ratio": 0.25, **spec}
    path = check.out / "pretrain" / f"{method}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(recipe, indent=1) + "\n")  # JSON is YAML
    return path


def step_pretrain(check: Check) -> tuple[str, dict[str, Any]]:
    details: dict[str, Any] = {}
    failures = []
    for method in ("mae", "crossmae"):
        recipe = _pretrain_recipe(check, method)
        full, resumed = check.out / "pretrain" / method / "full", check.out / "pretrain" / method / "resumed"
        for folder in (full, resumed):
            shutil.rmtree(folder, ignore_errors=True)
        try:
            check.torchrun("tools/main_pretrain.py", "--config", recipe, "--output_dir", full)
            ckpt = full / "checkpoint-0.pth"
            if not ckpt.is_file() or not (full / "checkpoint-last.pth").is_file():
                raise StepFailed(f"{method}: no checkpoint written in {full}")
            # the trainer's own resume: epoch 1 again, from the first epoch's checkpoint, in a fresh folder
            check.torchrun("tools/main_pretrain.py", "--config", recipe, "--output_dir", resumed, "--resume", ckpt)
        except StepFailed as e:
            if isinstance(e, StepTimedOut):
                raise StepTimedOut(f"{method}: {e}") from None
            failures.append(f"{method}: {e}")
            continue
        a, b = read_log(full), read_log(resumed)
        losses = [r["train_loss"] for r in a]
        last_a, last_b = a[-1]["train_loss"], b[-1]["train_loss"] if b else float("nan")
        diff = abs(last_a - last_b) / max(abs(last_a), 1e-12)
        details[method] = {"losses": losses, "resumed_loss": last_b, "relative_difference": diff,
                           "images_per_s": [r["train_images_per_s"] for r in a],
                           "epoch_time_s": [r["train_epoch_time_s"] for r in a]}
        if not all(map(math.isfinite, losses + [last_b])):
            failures.append(f"{method}: non-finite loss {losses + [last_b]}")
        elif diff > RESUME_RTOL:
            failures.append(f"{method}: resumed loss {last_b:.6g} vs uninterrupted {last_a:.6g} "
                            f"(relative difference {diff:.2g} > {RESUME_RTOL:g})")
    if "crossmae" in details:
        failures += _fsdp_run(check, details)
    if failures:
        raise StepFailed("; ".join(failures))
    parts = [f"{m.upper() if m == 'mae' else 'CrossMAE'} loss {' -> '.join(f'{x:.4f}' for x in d['losses'])}, "
             f"resumed {d['resumed_loss']:.4f} ({'equal' if d['relative_difference'] == 0 else 'rel. diff %.1e' % d['relative_difference']}), "
             f"{d['images_per_s'][-1]:.1f} img/s" for m, d in details.items() if m != "crossmae_fsdp"]
    fsdp = details["crossmae_fsdp"]
    parts.append(f"CrossMAE --fsdp --activation_checkpointing loss {' -> '.join(f'{x:.4f}' for x in fsdp['losses'])} "
                 f"(rel. diff to DDP {fsdp['relative_difference']:.1e}), sharded checkpoint resumed")
    spec = PRETRAIN[check.cfg.tiny]
    return f"ViT-{spec['size']} at {spec['input_size']} px, batch {spec['batch_size']}: " + "; ".join(parts), details


def _fsdp_run(check: Check, details: dict[str, Any]) -> list[str]:
    """CrossMAE's run again with `--fsdp --activation_checkpointing` (FSDP2 in one process: bf16 parameters on CUDA,
    sharded checkpoint folders), then epoch 1 again from its epoch-0 folder; its losses against the DDP run's."""
    recipe = check.out / "pretrain" / "crossmae.yaml"
    full, resumed = (check.out / "pretrain" / "crossmae_fsdp" / run for run in ("full", "resumed"))
    for folder in (full, resumed):
        shutil.rmtree(folder, ignore_errors=True)
    flags = ("--fsdp", "--activation_checkpointing")
    try:
        check.torchrun("tools/main_pretrain.py", "--config", recipe, "--output_dir", full, *flags)
        if not (full / "checkpoint-0.dcp").is_dir():
            return [f"crossmae --fsdp: no sharded checkpoint folder checkpoint-0.dcp in {full}"]
        check.torchrun("tools/main_pretrain.py", "--config", recipe, "--output_dir", resumed, "--resume",
                       full / "checkpoint-0.dcp", *flags)
    except StepTimedOut:
        raise
    except StepFailed as e:
        return [f"crossmae --fsdp: {e}"]
    losses = [r["train_loss"] for r in read_log(full)]
    ddp, again = details["crossmae"]["losses"][-1], read_log(resumed)[-1]["train_loss"]
    diff = abs(losses[-1] - ddp) / max(abs(ddp), 1e-12)
    details["crossmae_fsdp"] = {"losses": losses, "resumed_loss": again, "relative_difference": diff}
    tol = FSDP_RTOL["cuda" if check.cfg.device.startswith("cuda") else "cpu"]
    if not all(map(math.isfinite, losses + [again])):
        return [f"crossmae --fsdp: non-finite loss {losses + [again]}"]
    if diff > tol or abs(again - losses[-1]) > tol * abs(losses[-1]):
        return [f"crossmae --fsdp: last loss {losses[-1]:.6g} (resumed {again:.6g}) against DDP's {ddp:.6g}, "
                f"beyond {tol:g}"]
    return []


# -------------------------------------------------------------------------------------------------- 3. benchmark

def benchmark_args(tiny: bool, device: str, out: Path) -> list[str]:
    """`tools/benchmark.py` flags: ViT-B at 224 and 448 px on the GPU; a tiny model, no memory processes, dry."""
    if tiny:
        size = ["--size", "tiny", "--input-size", "32", "--patch-size", "8", "--sweep", "--batch-size", "2",
                "--steps", "1", "--warmup", "0", "--no-memory"]
    else:
        size = ["--size", "base", "--input-size", "224", "--sweep", "448", "--batch-size", "64", "--steps", "5",
                "--warmup", "2"]
    return [*size, "--device", device, "--output", str(out)]


def paper_ratios(rows: list[dict[str, Any]], input_size: int) -> list[dict[str, Any]]:
    """Per CrossMAE row at `input_size`: MAE step time / its step time and its peak memory / MAE's, with MFU."""
    main = [r for r in rows if r["input_size"] == input_size]
    if not main:
        return []
    mae = main[0]
    out = []
    for r in main[1:]:
        if r["method"] != "CrossMAE":
            continue
        out.append({"variant": r["variant"], "speedup": mae["step_s"] / r["step_s"],
                    "memory": r["peak_mib"] / mae["peak_mib"] if r.get("peak_mib") and mae.get("peak_mib") else None,
                    "mfu": r.get("mfu"), "mae_mfu": mae.get("mfu")})
    return out


def compiled_ratios(eager: list[dict[str, Any]], compiled: list[dict[str, Any]]) -> dict[str, float]:
    """Per variant measured both ways at the same input size: eager step time / compiled step time."""
    times = {(r["input_size"], r["variant"]): r["step_s"] for r in eager}
    return {r["variant"]: times[(r["input_size"], r["variant"])] / r["step_s"] for r in compiled
            if (r["input_size"], r["variant"]) in times}


def step_benchmark(check: Check) -> tuple[str, dict[str, Any]]:
    folder = check.out / "benchmark"
    check.python(ROOT / "tools" / "benchmark.py", *benchmark_args(check.cfg.tiny, check.cfg.device, folder))
    rows = json.loads((folder / "benchmark.json").read_text())
    speedups = {}
    if not check.cfg.tiny:  # the compiled path at 224 px (compiling takes minutes; the CPU dry run leaves it out)
        compiled = folder / "compiled"
        check.python(ROOT / "tools" / "benchmark.py", "--size", "base", "--input-size", "224", "--sweep",
                     "--batch-size", "64", "--steps", "5", "--warmup", "3", "--no-memory", "--compile",
                     "--device", check.cfg.device, "--output", str(compiled))
        speedups = compiled_ratios(rows, json.loads((compiled / "benchmark.json").read_text()))
    size = rows[0]["input_size"]
    ratios = paper_ratios(rows, size)
    parts = []
    for r in ratios:
        mem = "n/a" if r["memory"] is None else f"{r['memory']:.2f}x"
        mfu = "" if r["mfu"] is None else f", MFU {r['mfu']:.1%} (MAE {r['mae_mfu']:.1%})"
        parts.append(f"{r['variant']}: {r['speedup']:.2f}x faster, {mem} memory{mfu}")
    summary = (f"at {size} px vs MAE (paper: {PAPER_SPEEDUP}x faster, {PAPER_MEMORY}x memory): " + "; ".join(parts))
    if speedups:
        summary += "; torch.compile: " + ", ".join(f"{v} {x:.2f}x" for v, x in speedups.items()) + " eager's speed"
    return summary, {"rows": rows, "ratios": ratios, "compiled_speedup": speedups,
                     "table": str(folder / "benchmark.md")}


# -------------------------------------------------------------------------------------------------- 4. detection

# Run in a child (detectron2 comes from the temporary site): a COCO-format shapes set, json + images.
_SHAPES = ("from detection.datasets import write_builtin_shapes; "
           "write_builtin_shapes({folder!r}, num_train={train}, num_val={val}, image_size={size}, seed=0)")
DETECTION = {  # (GPU, --tiny)
    False: dict(config="configs/COCO/mask_rcnn_vitdet_b_100ep.py", impls=("sdpa", "folded", "eager"), train=16,
                val=8, size=640, iters=20,
                overrides=["dataloader.train.total_batch_size=2", "dataloader.train.num_workers=4",
                           "dataloader.test.num_workers=4", "train.log_period=5"]),
    True: dict(config="configs/demo/mask_rcnn_vit_smoke_builtin.py", impls=("sdpa",), train=8, val=4, size=64,
               iters=2, overrides=["train.device=cpu", "train.log_period=1"]),
}


def step_detection(check: Check) -> tuple[str, dict[str, Any]]:
    spec = DETECTION[check.cfg.tiny]
    data = check.out / "detection" / "data"
    if not (data / "DONE").is_file():
        shutil.rmtree(data, ignore_errors=True)
        check.python("-c", _SHAPES.format(folder=str(data), train=spec["train"], val=spec["val"], size=spec["size"]))
    details: dict[str, Any] = {"config": spec["config"], "iterations": spec["iters"]}
    parts, failures = [], []
    for impl in spec["impls"]:
        run_dir = check.out / "detection" / impl
        shutil.rmtree(run_dir, ignore_errors=True)
        args = ["--config-file", ROOT / spec["config"],
                "--dataset", "gpu_check_train", data / "annotations" / "train.json", data,
                "--dataset", "gpu_check_val", data / "annotations" / "val.json", data,
                "dataloader.train.dataset.names=gpu_check_train", "dataloader.test.dataset.names=gpu_check_val",
                f"train.max_iter={spec['iters']}", "train.eval_period=0", f"train.checkpointer.period={spec['iters']}",
                f"model.backbone.net.attn_impl={impl}", f"train.output_dir={run_dir}", *spec["overrides"]]
        try:
            text = check.python(ROOT / "tools" / "train_net.py", *args)
        except StepTimedOut as e:
            raise StepTimedOut(f"{impl}: {e}") from None
        except StepFailed as e:
            failures.append(f"{impl}: {e}")
            continue
        ap = json.loads((run_dir / "ap.json").read_text()) if (run_dir / "ap.json").is_file() else {}
        mems = [int(m) for m in re.findall(r"max_mem: (\d+)M", text)]
        times = [float(t) for t in re.findall(r"\btime: ([0-9.]+)", text)]
        details[impl] = {"ap": ap, "peak_mib": max(mems) if mems else None,
                         "iteration_s": times[-1] if times else None}
        mem = f"{max(mems)} MiB peak" if mems else "peak memory n/a (CPU)"
        box = ap.get("bbox", {}).get("AP") if isinstance(ap.get("bbox"), dict) else None
        parts.append(f"{impl}: {mem}, " + (f"box AP {box:.1f}" if box is not None else "evaluated"))
    if failures:
        raise StepFailed("; ".join(failures))
    return f"{Path(spec['config']).name}, {spec['iters']} iterations + evaluation: " + "; ".join(parts), details


# ------------------------------------------------------------------------------------------------------- 5. demo

def demo_settings(seconds: float) -> list[str]:
    """`--set` values of the small preset sized to `seconds` on one GPU: a guess, scaled linearly (never measured:
    a run past the limit is reported as timed out; its finished steps are kept by the demo's reuse)."""
    scale = max(seconds, MIN_DEMO_S) / 240  # about 4 minutes: 100 epochs of 4 steps, 600 detection iterations
    return [f"pretrain.epochs={max(10, int(100 * scale))}", "pretrain.snapshot_every=10",
            f"detection.iters={max(100, int(600 * scale))}", "detection.checkpoint_period=100000"]


def step_demo(check: Check) -> tuple[str, dict[str, Any]]:
    if check.cfg.tiny:
        raise StepSkipped("--tiny: the smoke demo has its own tests (tests/workflows/demo)")
    left = check.remaining()
    if left < MIN_DEMO_S:
        raise StepSkipped(f"{left:.0f} s left in the budget, under the {MIN_DEMO_S} s the demo needs")
    settings = demo_settings(left - 30)  # the report and the model builds
    check.python(ROOT / "tools" / "demo.py", "--size", "small", "--output", check.out / "demo", "--jobs", "1",
                 "--set", *settings)
    report = check.out / "demo" / "report.md"
    return f"--size small --set {' '.join(settings)}: report in demo/report.md", {"settings": settings,
                                                                                   "report": str(report)}


# ------------------------------------------------------------------------------------------- the steps by name

STEP_FUNCTIONS: dict[str, Callable[[Check], tuple[str, dict[str, Any]]]] = {
    "stack": step_stack, "pretrain": step_pretrain, "benchmark": step_benchmark, "detection": step_detection,
    "demo": step_demo}
