"""The demo's run: per seed, both pretrainings, their curves and the detectors, scheduled two at a time; then the
report over every seed."""
from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from multiprocessing.pool import Pool
from pathlib import Path
from typing import Any

from detection.schedule import vitdet_milestones
from pretrain.errors import ConfigError
from pretrain.runlock import LOCK_FILE, run_lock

from .curves import curve_task
from .data import detection_sets, folder_images, pretraining_folder
from .detector_view import detector_view
from .detectors import convert, finetune, finished_detection
from .labels import DETECTOR_ORDER, METHODS, NAMES, detector_run, log
from .presets import apply_settings, load_preset
from .pretraining import finished_pretraining, forward_gflops, pretrain, step0_encoder
from .report import write_report
from .scheduler import Task, plan_jobs, run_tasks, worker_pool

__all__ = ["run_seed", "run"]


def _steps_done(run_dir: Path, steps_per_epoch: int) -> int:
    """Optimizer steps a pretraining run has finished: its epoch records times steps per epoch."""
    log_file = run_dir / "log.txt"
    return len(log_file.read_text().splitlines()) * steps_per_epoch if log_file.is_file() else 0


def _iters_done(run_dir: Path) -> int:
    """Iterations a detection run has finished, from the last record of its metrics.json."""
    lines = (run_dir / "metrics.json").read_text().splitlines() if (run_dir / "metrics.json").is_file() else []
    for line in reversed(lines):
        try:
            return int(json.loads(line).get("iteration", -1)) + 1
        except ValueError:  # a line being written
            continue
    return 0


VIEWS = ("step0", *METHODS)  # the encoders of the detector-view probe


def _view_tasks(cfg: dict, seed_out: Path, seed: int, sets: dict[str, tuple[str, str]], step0: Path,
                final_weights: Callable[[str, dict], Path]) -> list[Task]:
    """The detector-view probe of the converted step-0 encoder and of each method's final one."""
    return [Task(f"view_{key}", lambda r, key=key: (detector_view, (
        key, final_weights(key, r) if key in METHODS else step0, seed_out / "detector_view" / f"{key}.json", sets,
        cfg, seed)), after=[f"pretrain_{key}"] if key in METHODS else []) for key in VIEWS]


def run_seed(cfg: dict, seed_out: Path, seed: int, data: Path, sets: dict[str, tuple[str, str]],
             gflops: dict[str, dict[str, float]], pool: Pool | None, jobs: int,
             threads: int) -> dict[str, Any]:
    """One seed: both pretrainings, their curves, and the detectors, scheduled on the pool's workers.

    The order keeps both workers busy to the end: MAE's pretraining (the longest run) beside a control detector
    (the controls need only the step-0 encoder) and then CrossMAE's pretraining, each method's curve and
    detector as soon as its pretraining ends, the other control last; run both pretrainings first instead, and
    the last detector runs alone while the other worker idles.
    """
    init = step0_encoder(cfg, seed_out, seed)
    per_epoch = len(folder_images(data)) // cfg["pretrain"]["batch_size"]
    steps = per_epoch * cfg["pretrain"]["epochs"]
    iters = cfg["detection"]["iters"]
    inits: dict[str, Path | None] = {"vitdet_random": None,
                                     "step0": convert(init, seed_out / "pretrain" / "d2_step0.pth", cfg)}
    detectors = [(detector_run(key, frozen), key, frozen)  # in the report's order
                 for frozen in ([False, True] if cfg["detection"].get("frozen") else [False])
                 for key in DETECTOR_ORDER
                 if not (frozen and key == "vitdet_random")]  # a frozen random backbone says nothing of pretraining
    det_dirs = {name: seed_out / "detection" / name for name, _, _ in detectors}

    def final_weights(method: str, results: dict) -> Path:
        last = sorted((Path(results[f"pretrain_{method}"]["run_dir"]) / "snapshots").glob("step-*.pth"))[-1]
        return convert(last, seed_out / "pretrain" / f"d2_{method}.pth", cfg)

    tasks = [Task(f"pretrain_{m}", lambda r, m=m: (pretrain, (m, cfg, seed_out, seed, data, init)),
                  finished=finished_pretraining(m, cfg, seed_out, seed, data, init)) for m in METHODS]
    tasks += [Task(f"curve_{m}", lambda r, m=m: (curve_task, (m, r[f"pretrain_{m}"], sets, cfg, gflops[m])),
                   after=[f"pretrain_{m}"]) for m in METHODS]
    tasks += _view_tasks(cfg, seed_out, seed, sets, inits["step0"], final_weights)
    det_tasks = []
    for name, key, frozen in detectors:
        def make(r, name=name, key=key, frozen=frozen):
            weights = final_weights(key, r) if key in METHODS else inits[key]
            return finetune, (key, weights, det_dirs[name], cfg, seed, frozen, threads if pool else None)
        det_tasks.append(Task(f"detection_{name}", make, [f"pretrain_{key}"] if key in METHODS else [],
                              finished=finished_detection(key, det_dirs[name], cfg, seed, frozen)))
    det_tasks.sort(key=lambda t: not t.after)  # the pretrained ones as soon as they can, then the controls
    first_control = next(t for t in det_tasks if not t.after)
    det_tasks.remove(first_control)
    # MAE's pretraining is the longest run: a control starts beside it, CrossMAE's (shorter) pretraining after
    tasks = [tasks[0], first_control, *tasks[1:], *det_tasks]

    def progress() -> tuple[int, str]:
        pre = {m: _steps_done(seed_out / "pretrain" / m, per_epoch) for m in METHODS}
        det = {name: _iters_done(d) for name, d in det_dirs.items()}
        status = [f"{NAMES[m]} {pre[m]}/{steps}" for m in METHODS if pre[m] < steps]
        status += [f"{name} {n}/{iters} it" for name, n in det.items() if 0 < n < iters]
        return sum(pre.values()) + sum(det.values()), ", ".join(status)

    results = run_tasks(tasks, pool, jobs, threads, seed_out / "logs", progress,
                        total=len(METHODS) * steps + len(detectors) * iters,
                        desc=f"seed {seed}: pretraining steps + detection iterations")
    return {"seed": seed, "pretrain": {m: results[f"pretrain_{m}"] for m in METHODS},
            "curves": {m: results[f"curve_{m}"] for m in METHODS},
            "detector_view": {key: results[f"view_{key}"] for key in VIEWS},
            "detection": {name: results[f"detection_{name}"] for name, _, _ in detectors},
            "seed_dir": str(seed_out)}


def run(output: str | Path | None = None, preset: str = "tiny", seeds: Sequence[int] = (0,),
        budget: str | None = None, fresh: bool = False, jobs: int | None = None, settings: Sequence[str] = ()) -> str:
    """Run the demo (see the module docstring); returns the report's markdown.

    `jobs` runs side by side (default `plan_jobs`): the two pretrainings, the two curves and the detectors run
    that many at a time, each on its share of the threads. Results do not depend on it beyond the run-to-run
    spread of multi-threaded float sums. `settings` are `KEY=VALUE` items over the preset (`apply_settings`).

    Raises:
        FolderInUse: another demo holds the output folder (`pretrain.runlock`); nothing in it is touched.
    """
    seeds = list(seeds)
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {' '.join(map(str, seeds))} repeats a seed; give distinct seeds")
    cfg = apply_settings(load_preset(preset, budget), settings)
    vitdet_milestones(cfg["detection"]["iters"])  # a schedule too short fails here, not after pretraining
    jobs, threads = plan_jobs(jobs)
    out = Path(output if output is not None else "demo_output" if budget is None else f"demo_output/{budget}")
    out = out.resolve()  # summaries store paths: valid from any working directory
    with run_lock(out, "--output"):  # one demo per folder; its pretrainings and detectors lock their own
        if fresh:
            _clear(out)
        t_start = time.time()
        sets = detection_sets(cfg)
        data = pretraining_folder(sets, out)
        gflops = {m: forward_gflops(m, cfg) for m in METHODS}
        log(f"{jobs} run(s) at a time, {threads} thread(s) each"
            + ("; --jobs 1 runs one at a time" if jobs > 1 else ""))
        with worker_pool(jobs) as pool:  # a failed or interrupted run stops the rest: atomic writes, train_net killed
            runs = [run_seed(cfg, out / f"seed{seed}", seed, data, sets, gflops, pool, jobs, threads)
                    for seed in seeds]
        cfg["parallel"] = {"jobs": jobs, "threads": threads}
        return write_report(out, cfg, runs, gflops, sets, time.time() - t_start)


def _clear(out: Path) -> None:
    """Delete everything in `out` but its lock file, which must stay the one this demo holds."""
    for path in out.iterdir():
        if path.name == LOCK_FILE:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
