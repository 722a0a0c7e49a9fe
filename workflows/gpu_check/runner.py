"""Runs the selected steps of the GPU check within the budget and writes its report; `main` is the command line."""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from pretrain.errors import command
from pretrain.files import write_json_atomic, write_text_atomic

from . import steps
from .check import ROOT, STEPS, Check, CheckConfig, StepFailed, StepResult, StepSkipped, StepTimedOut
from .report import plot_check, report_text

# seconds of an 8-minute GPU budget each step may take; scaled with --budget. The demo takes what is left.
SHARES = {"stack": 45, "pretrain": 110, "benchmark": 110, "detection": 110}
# What each step needs of torch: the check runs against the torch it finds (2.11 on the lent machines, 2.13.0
# pinned); a step listed here is skipped with a line saying so. No step needs a 2.13-only feature today.
MIN_TORCH: dict[str, tuple[int, int]] = {}


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
        summary, details = steps.STEP_FUNCTIONS[name](check)
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
    write_json_atomic(check.out / "gpu_check.json", result, indent=1)
    plot_check(result, check.out / "gpu_check.png")
    write_text_atomic(check.out / "benchmark_gpu.md", report_text(result))
    print(f"wrote {check.out / 'benchmark_gpu.md'}, gpu_check.json, gpu_check.png", flush=True)
    return result


@command
def main(argv: Sequence[str] | None = None) -> int:
    """The GPU readiness check: stack, pretraining with resume, benchmark, detection, demo; a report of each."""
    p = argparse.ArgumentParser(prog="tools/gpu_check.sh", description=main.__doc__)
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
