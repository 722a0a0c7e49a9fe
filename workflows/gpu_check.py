"""The GPU readiness check (`tools/gpu_check.sh`): a few lent GPU minutes turned into the project's first GPU numbers.

Starting from a copied working tree on a machine whose Python has torch but no package registry, it runs, each
step time-limited and independent of the others (a failing step is reported, the rest still run):

1. `stack`: installs the carried wheels (`tools/gpu_wheels.sh`) into a temporary site, without network, checks the
   stack (`workflows.environment`), prints the versions and the device;
2. `pretrain`: MAE and CrossMAE through the real trainer under `torchrun --nproc_per_node 1` (ViT-B/16 at 224 px,
   bf16 on CUDA), two epochs of a few iterations: losses finite, a checkpoint written, the second epoch redone
   from the first epoch's checkpoint with the trainer's own `--resume`, its loss against the uninterrupted run's;
3. `benchmark`: `tools/benchmark.py` (MAE and CrossMAE side by side: step time, peak memory, MFU) and the
   CrossMAE / MAE ratios against the paper's 1.48x faster and 0.54x the memory;
4. `detection`: `tools/train_net.py` with the COCO ViTDet-B Mask R-CNN config at 1024 px, batch 2, on a generated
   COCO-format shapes set, a few iterations and an evaluation, once per attention path (sdpa, eager), with the
   peak memory detectron2 logs;
5. `demo`: `tools/demo.py --size small` with its pretraining and detection sized to the budget left;
6. writes `benchmark_gpu.md`, `gpu_check.json` and `gpu_check.png` into the output folder, with the device,
   torch version and commit.

`--device cpu --tiny` is the dry run of the tests: the same steps and tools with tiny models and configs.
Everything runs in child processes (whose Python path holds the temporary site), so this module imports only
what the GPU machine has before the wheels are installed.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import re
import shutil
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pretrain.analysis.figures import save_figure  # noqa: E402
from pretrain.errors import ConfigError, command  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("stack", "pretrain", "benchmark", "detection", "demo")
# seconds of an 8-minute GPU budget each step may take; scaled with --budget. The demo takes what is left.
SHARES = {"stack": 45, "pretrain": 110, "benchmark": 110, "detection": 110}
MIN_DEMO_S = 60  # the demo is skipped with less than this left
# The CrossMAE paper, ViT-B on 2 x A100: CrossMAE 1.48x faster per epoch than MAE, at 0.54x its memory.
PAPER_SPEEDUP, PAPER_MEMORY = 1.48, 0.54
# What each step needs of torch: the check runs against the torch it finds (2.11 on the lent machines, 2.13.0
# pinned); a step listed here is skipped with a line saying so. No step needs a 2.13-only feature today.
MIN_TORCH: dict[str, tuple[int, int]] = {}
RESUME_RTOL = 1e-3  # bf16 CUDA kernels need not be bitwise deterministic; on CPU the losses are equal
# Pretraining runs: (GPU, --tiny). Two epochs of 4 iterations each.
PRETRAIN = {
    False: dict(input_size=224, batch_size=64, builtin_size=256, num_workers=4, size="base"),
    True: dict(input_size=32, batch_size=4, builtin_size=16, num_workers=0, size="tiny",
               model_kwargs={"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "decoder_embed_dim": 32,
                             "decoder_num_heads": 2}, decoder_depth=2),
}


@dataclass
class CheckConfig:
    """What `run_check` does; the fields are `tools/gpu_check.sh`'s flags."""

    out: str = "output/gpu_check"
    device: str = "cuda"
    tiny: bool = False
    budget: float = 480.0  # seconds for all steps together
    wheels: str | None = None  # folder of carried wheels; None: .whl when it exists; "": none
    steps: Sequence[str] = STEPS
    commit: str | None = None  # None: `git rev-parse`, where there is a .git

    def __post_init__(self) -> None:
        unknown = [s for s in self.steps if s not in STEPS]
        if unknown:
            raise ConfigError(f"--steps {' '.join(unknown)}: no such step; choose from {' '.join(STEPS)}")
        if self.budget <= 0:
            raise ConfigError(f"--budget {self.budget:g} must be positive (seconds)")


@dataclass
class StepResult:
    """One step's outcome: status is ok, failed, timed out or skipped; summary is one line."""

    name: str
    status: str
    seconds: float
    summary: str
    details: dict[str, Any] = field(default_factory=dict)


class StepFailed(Exception):
    """A step's check did not hold; the message is the report's line."""


class StepTimedOut(StepFailed):
    """A child process ran past the step's time limit."""


class StepSkipped(Exception):
    """A step that does not run here; the message says why."""


class Check:
    """The state shared by the steps: output folder, child environment, deadline of the current step."""

    def __init__(self, cfg: CheckConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out).resolve()
        self.logs = self.out / "logs"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1",
                    "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
        self.site: Path | None = None
        self.deadline = 0.0
        self.log: Path = self.logs / "check.log"
        self.port = 29600

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def call(self, args: Sequence[str], cwd: Path = ROOT) -> str:
        """Run a child (its process group killed at the step's deadline); returns its output, also logged.

        Raises:
            StepTimedOut: it ran past the deadline.
            StepFailed: it exited with a non-zero status; the message holds its last error line.
        """
        limit = self.remaining()
        if limit <= 1:
            raise StepTimedOut("no time left in the step's limit")
        with open(self.log, "a") as log:
            log.write(f"$ {' '.join(map(str, args))}\n")
            log.flush()
            start = log.tell()
            proc = subprocess.Popen([str(a) for a in args], cwd=cwd, env=self.env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                raise StepTimedOut(f"{Path(str(args[1]) if len(args) > 1 else str(args[0])).name} ran past the "
                                   f"step's limit") from None
        text = self.log.read_bytes()[start:].decode(errors="replace")
        if rc:
            raise StepFailed(f"exit {rc}: {_last_error(text)} (log: {self.log.relative_to(self.out)})")
        return text

    def python(self, *args: Any) -> str:
        return self.call([sys.executable, *map(str, args)])

    def torchrun(self, tool: str, *args: Any) -> str:
        self.port += 1
        return self.call([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
                          "--master_port", str(self.port), str(ROOT / tool), *map(str, args)])


def _kill_group(proc: subprocess.Popen) -> None:
    """End a child and everything it started (torchrun's workers, data loader workers)."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _last_error(text: str) -> str:
    """The most telling line of a failed child's output: its `error:` line or exception, else its last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error: ") or re.match(r"^[A-Za-z_.]*(Error|Exception)\b", line):
            return line[:300]
    return lines[-1][:300] if lines else "no output"


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


def _read_log(folder: Path) -> list[dict[str, Any]]:
    path = folder / "log.txt"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


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
        a, b = _read_log(full), _read_log(resumed)
        losses = [r["train_loss"] for r in a]
        last_a, last_b = a[-1]["train_loss"], b[-1]["train_loss"] if b else float("nan")
        diff = abs(last_a - last_b) / max(abs(last_a), 1e-12)
        details[method] = {"losses": losses, "resumed_loss": last_b, "relative_difference": diff,
                           "images_per_s": [r["train_images_per_s"] for r in a],
                           "epoch_time_s": [r["train_epoch_time_s"] for r in a]}
        if not all(map(_finite, losses + [last_b])):
            failures.append(f"{method}: non-finite loss {losses + [last_b]}")
        elif diff > RESUME_RTOL:
            failures.append(f"{method}: resumed loss {last_b:.6g} vs uninterrupted {last_a:.6g} "
                            f"(relative difference {diff:.2g} > {RESUME_RTOL:g})")
    if failures:
        raise StepFailed("; ".join(failures))
    parts = [f"{m.upper() if m == 'mae' else 'CrossMAE'} loss {' -> '.join(f'{x:.4f}' for x in d['losses'])}, "
             f"resumed {d['resumed_loss']:.4f} ({'equal' if d['relative_difference'] == 0 else 'rel. diff %.1e' % d['relative_difference']}), "
             f"{d['images_per_s'][-1]:.1f} img/s" for m, d in details.items()]
    spec = PRETRAIN[check.cfg.tiny]
    return f"ViT-{spec['size']} at {spec['input_size']} px, batch {spec['batch_size']}: " + "; ".join(parts), details


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


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


def step_benchmark(check: Check) -> tuple[str, dict[str, Any]]:
    folder = check.out / "benchmark"
    check.python(ROOT / "tools" / "benchmark.py", *benchmark_args(check.cfg.tiny, check.cfg.device, folder))
    rows = json.loads((folder / "benchmark.json").read_text())
    size = rows[0]["input_size"]
    ratios = paper_ratios(rows, size)
    parts = []
    for r in ratios:
        mem = "n/a" if r["memory"] is None else f"{r['memory']:.2f}x"
        mfu = "" if r["mfu"] is None else f", MFU {r['mfu']:.1%} (MAE {r['mae_mfu']:.1%})"
        parts.append(f"{r['variant']}: {r['speedup']:.2f}x faster, {mem} memory{mfu}")
    summary = (f"at {size} px vs MAE (paper: {PAPER_SPEEDUP}x faster, {PAPER_MEMORY}x memory): " + "; ".join(parts))
    return summary, {"rows": rows, "ratios": ratios, "table": str(folder / "benchmark.md")}


# -------------------------------------------------------------------------------------------------- 4. detection

# Run in a child (detectron2 comes from the temporary site): a COCO-format shapes set, json + images.
_SHAPES = ("from detection.datasets import write_builtin_shapes; "
           "write_builtin_shapes({folder!r}, num_train={train}, num_val={val}, image_size={size}, seed=0)")
DETECTION = {  # (GPU, --tiny)
    False: dict(config="configs/COCO/mask_rcnn_vitdet_b_100ep.py", impls=("sdpa", "eager"), train=16, val=8,
                size=640, iters=20, overrides=["dataloader.train.total_batch_size=2", "dataloader.train.num_workers=4",
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


# ------------------------------------------------------------------------------------------------ the check

STEP_FUNCTIONS: dict[str, Callable[[Check], tuple[str, dict[str, Any]]]] = {
    "stack": step_stack, "pretrain": step_pretrain, "benchmark": step_benchmark, "detection": step_detection,
    "demo": step_demo}


def _limits(cfg: CheckConfig) -> dict[str, float]:
    scale = cfg.budget / 480.0
    return {name: share * scale for name, share in SHARES.items()}


def _torch_version() -> tuple[int, int] | None:
    try:
        major, minor = importlib.metadata.version("torch").split(".")[:2]
        return int(major), int(minor)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None


def run_step(check: Check, name: str, limit: float) -> StepResult:
    """One step within `limit` seconds; any failure becomes its result, never an exception."""
    start = time.monotonic()
    check.deadline = start + limit
    check.log = check.logs / f"{name}.log"
    print(f"[{name}] up to {limit:.0f} s ...", flush=True)
    need, have = MIN_TORCH.get(name), _torch_version()
    try:
        if need and have and have < need:
            raise StepSkipped(f"needs torch {need[0]}.{need[1]}, found {have[0]}.{have[1]}")
        summary, details = STEP_FUNCTIONS[name](check)
        status = "ok"
    except StepSkipped as e:
        status, summary, details = "skipped", str(e), {}
    except StepTimedOut as e:
        status, summary, details = "timed out", f"{e} ({limit:.0f} s)", {}
    except Exception as e:  # noqa: BLE001 - a step's failure of any kind is reported; the others still run
        status, summary, details = "failed", f"{type(e).__name__ + ': ' if not isinstance(e, StepFailed) else ''}{e}", {}
    result = StepResult(name, status, time.monotonic() - start, summary, details)
    print(f"[{name}] {status} in {result.seconds:.0f} s: {summary}", flush=True)
    return result


def _commit(cfg: CheckConfig) -> str:
    if cfg.commit:
        return cfg.commit
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (no git here: pass --commit)"
    if head.returncode:
        return "unknown (no git here: pass --commit)"
    return head.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def run_check(cfg: CheckConfig, command_line: str = "") -> dict[str, Any]:
    """Run the selected steps within the budget and write the report, JSON and plot into `cfg.out`.

    Returns:
        The JSON-ready result: header fields and one entry per step (name, status, seconds, summary, details).
    """
    check = Check(cfg)
    check.out.mkdir(parents=True, exist_ok=True)
    check.logs.mkdir(exist_ok=True)
    begin = time.monotonic()
    end = begin + cfg.budget
    limits = _limits(cfg)
    results = []
    try:
        for name in STEPS:
            if name not in cfg.steps:
                results.append(StepResult(name, "skipped", 0.0, "not selected (--steps)"))
                continue
            left = end - time.monotonic()
            limit = left if name == "demo" else min(limits[name], left)
            if limit < 5:
                results.append(StepResult(name, "skipped", 0.0, f"no time left in the --budget of {cfg.budget:g} s"))
                continue
            results.append(run_step(check, name, limit))
    finally:
        if check.site is not None:
            shutil.rmtree(check.site, ignore_errors=True)
    stack = next((r.details for r in results if r.name == "stack" and r.details), {})
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "command": command_line,
              "device": stack.get("device_name") or ("CPU" if cfg.device == "cpu" else f"{cfg.device} (not seen)"),
              "torch": (stack.get("versions") or {}).get("torch") or importlib.metadata.version("torch"),
              "commit": _commit(cfg), "tiny": cfg.tiny, "budget_s": cfg.budget,
              "total_s": time.monotonic() - begin, "steps": [asdict(r) for r in results]}
    (check.out / "gpu_check.json").write_text(json.dumps(result, indent=1) + "\n")
    plot_check(result, check.out / "gpu_check.png")
    (check.out / "benchmark_gpu.md").write_text(report_text(result))
    print(f"wrote {check.out / 'benchmark_gpu.md'}, gpu_check.json, gpu_check.png", flush=True)
    return result


# --------------------------------------------------------------------------------------------------- 6. report

def report_text(result: dict[str, Any]) -> str:
    """The Markdown report: header, one row per step with its outcome, then the benchmark table if there is one."""
    steps = {s["name"]: s for s in result["steps"]}
    lines = [
        "# GPU check" + (" (dry run: --device cpu --tiny, no GPU numbers)" if result["tiny"] else ""), "",
        f"- date: {result['date']}",
        f"- command: `{result['command']}`",
        f"- device: {result['device']}; torch {result['torch']}",
        f"- commit: {result['commit']}",
        f"- budget {result['budget_s']:g} s; took {result['total_s']:.0f} s", "",
        "| step | outcome | seconds | summary |", "|---|---|---|---|",
    ]
    for s in result["steps"]:
        summary = s["summary"].replace("|", "/")
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.0f} | {summary} |")
    bench = steps.get("benchmark", {}).get("details", {})
    if bench.get("table") and Path(bench["table"]).is_file():
        text = Path(bench["table"]).read_text()
        table = [line for line in text.splitlines() if line.startswith("|") or line.startswith("- ")]
        lines += ["", "## Benchmark (tools/benchmark.py)", "", *table]
    lines += ["", "Logs of every child process: `logs/<step>.log` beside this file.", ""]
    return "\n".join(lines)


def plot_check(result: dict[str, Any], path: Path) -> None:
    """Seconds per step (coloured by outcome) and the pretraining losses per epoch, uninterrupted and resumed."""
    colours = {"ok": "tab:green", "failed": "tab:red", "timed out": "tab:orange", "skipped": "tab:gray"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.4))
    steps = result["steps"]
    ax1.barh([s["name"] for s in steps], [s["seconds"] for s in steps],
             color=[colours[s["status"]] for s in steps])
    for i, s in enumerate(steps):
        ax1.text(s["seconds"], i, f" {s['status']}", va="center", fontsize=8)
    ax1.invert_yaxis()
    ax1.set_xlabel("seconds")
    ax1.set_title(f"steps on {result['device']}", fontsize=10)
    pre = next((s["details"] for s in steps if s["name"] == "pretrain"), {})
    for method, d in pre.items():
        line, = ax2.plot(range(len(d["losses"])), d["losses"], marker="o", label=f"{method} uninterrupted")
        ax2.plot([len(d["losses"]) - 1], [d["resumed_loss"]], marker="x", markersize=10, color=line.get_color(),
                 linestyle="none", label=f"{method} resumed")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("train loss")
    ax2.set_title("pretraining under torchrun", fontsize=10)
    if pre:
        ax2.legend(fontsize=7)
    save_figure(fig, path, dpi=80)


@command
def main(argv: Sequence[str] | None = None) -> int:
    """The GPU readiness check: stack, pretraining with resume, benchmark, detection, demo; a report of each."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--out", default="output/gpu_check", help="folder for benchmark_gpu.md, gpu_check.json, "
                                                              "gpu_check.png and every step's outputs and logs")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --tiny: the dry run)")
    p.add_argument("--tiny", action="store_true", help="tiny models and configs: the dry run, seconds a step")
    p.add_argument("--budget", type=float, default=480.0,
                   help="seconds for all steps together (default 480); each step gets its share, the demo the rest")
    p.add_argument("--wheels", help="folder of carried wheels (tools/gpu_wheels.sh); default .whl where it exists; "
                                    "'' for none")
    p.add_argument("--steps", nargs="+", default=list(STEPS), help=f"steps to run (default all: {' '.join(STEPS)})")
    p.add_argument("--commit", help="the commit to name in the report (default: git rev-parse HEAD, where .git is)")
    argv = sys.argv[1:] if argv is None else list(argv)
    a = p.parse_args(argv)
    cfg = CheckConfig(out=a.out, device=a.device, tiny=a.tiny, budget=a.budget, wheels=a.wheels, steps=a.steps,
                      commit=a.commit)
    result = run_check(cfg, shlex.join(["tools/gpu_check.sh", *argv]))
    return 0 if all(s["status"] in ("ok", "skipped") for s in result["steps"]) else 1
