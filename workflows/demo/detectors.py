"""The demo's detectors: each encoder converted for the demo's ViTDet, Mask R-CNN fine-tuned from it through
tools/train_net.py with the preset's schedule, reused when finished with the same settings."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from detection.convert import convert_checkpoint
from detection.lazyconfig import target_from_config
from detection.report import ap_text
from detection.schedule import vitdet_milestones
from pretrain.files import write_json_atomic

from .labels import detector_label, detector_run, log
from .presets import DEMO_CONFIGS, ROOT
from .reuse import check_reusable

__all__ = ["convert", "schedule_overrides", "det_overrides", "finished_detection", "finetune"]


def convert(snapshot: Path, target: Path, preset: dict) -> Path:
    """A pretraining snapshot -> a detectron2 checkpoint, checked against the detector the demo fine-tunes."""
    if not target.is_file():
        shape = target_from_config(DEMO_CONFIGS / preset["detection"]["config"], det_overrides(preset))
        convert_checkpoint(snapshot, target, shape)
    return target


def schedule_overrides(iters: int, warmup: int = 25) -> list[str]:
    """train_net overrides that fit ViTDet's schedule to `iters` iterations: drops (x0.1 each) at 8/9 and 26/27
    of the run, after a warm-up of at most `warmup` iterations (a tenth of a short run); one evaluation at the end."""
    milestones = vitdet_milestones(iters)
    return [f"train.max_iter={iters}", "train.eval_period=0", "lr_multiplier.scheduler.values=[1.0,0.1,0.01]",
            f"lr_multiplier.scheduler.milestones={milestones}", f"lr_multiplier.scheduler.num_updates={iters}",
            f"lr_multiplier.warmup_length={min(warmup, iters // 10) / iters}"]


def det_overrides(preset: dict, frozen: bool = False) -> list[str]:
    """train_net overrides of the preset over its detection config: schedule, backbone shape, recipe, freezing."""
    det = preset["detection"]
    out = [*schedule_overrides(det["iters"]), f"model.backbone.net.pretrain_img_size={preset['pretrain']['input_size']}",
           f"train.checkpointer.period={det.get('checkpoint_period', det['iters'])}", *det.get("overrides", [])]
    return out + (["model.backbone.net.freeze=True"] if frozen else [])


def _det_settings(key: str, preset: dict, seed: int, frozen: bool) -> dict:
    """What a detector's result depends on, as its ap.json records it."""
    return {"config": preset["detection"]["config"], "init": key, "seed": seed, "frozen": frozen,
            "overrides": det_overrides(preset, frozen)}


def finished_detection(key: str, run_dir: Path, preset: dict, seed: int, frozen: bool = False) -> dict | None:
    """ap.json of this detector if it finished before with the same settings, else None.

    Raises:
        ConfigError: it finished with other settings.
    """
    ap = run_dir / "ap.json"
    if not ap.is_file():
        return None
    result = json.loads(ap.read_text())
    check_reusable(run_dir, result.get("settings", {}), _det_settings(key, preset, seed, frozen))
    log(f"detection {detector_label(detector_run(key, frozen))} (seed {seed}): done before, reusing {run_dir}")
    return result


def finetune(key: str, init: Path | None, run_dir: Path, preset: dict, seed: int, frozen: bool = False,
             threads: int | None = None) -> dict:
    """Mask R-CNN through tools/train_net.py into `run_dir` (its output in RUN_DIR/train_net.log; an interrupted
    run resumes from its last checkpoint), at `threads` torch threads (default: as this process); returns
    ap.json with the time and settings it was made with."""
    result = finished_detection(key, run_dir, preset, seed, frozen)
    if result is not None:
        return result
    ap = run_dir / "ap.json"
    settings = _det_settings(key, preset, seed, frozen)
    label = detector_label(detector_run(key, frozen))
    resume = (run_dir / "last_checkpoint").is_file()
    cmd = [sys.executable, str(ROOT / "tools" / "train_net.py"), "--config-file",
           str(DEMO_CONFIGS / preset["detection"]["config"]), "--resume" if resume else "--overwrite",
           f"train.output_dir={run_dir}", f"train.init_checkpoint={init or ''}", f"train.seed={seed}",
           f"dataloader.evaluator.output_dir={run_dir / 'inference'}", *settings["overrides"]]
    log(f"detection {label} (seed {seed}): {preset['detection']['iters']} iterations"
        + (" (resuming)" if resume else "") + f"; log in {run_dir / 'train_net.log'}")
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(run_dir / "train_net.log", "a") as f:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"tools/train_net.py failed (exit {proc.returncode}) for {label}; see "
                           f"{run_dir / 'train_net.log'}")
    result = json.loads(ap.read_text())
    result.update(time_s=time.time() - t0, settings=settings)
    write_json_atomic(ap, result)
    box, mask = (result[task].get("AP") for task in ("bbox", "segm"))  # None: no detection at all
    log(f"detection {label} (seed {seed}): box AP {ap_text(box)}, mask AP {ap_text(mask)} in "
        f"{result['time_s'] / 60:.1f} min")
    return result
