"""The whole path on one machine: does a CrossMAE backbone detect as well as an MAE one, for less compute?

Steps per seed, into OUTPUT/seed<S>/, each skipped when its output already exists (rerun after an
interruption to continue, or with more seeds to add runs; --fresh starts over):
  1. pretrain MAE and CrossMAE ViTs on the built-in images, same epochs and data (CrossMAE in the
     paper's efficient setting, prediction ratio 0.25);
  2. convert each encoder into a detectron2 ViTDet checkpoint;
  3. fine-tune Mask R-CNN on the built-in COCO-format shapes dataset from each, and from random
     initialisation as a control, for the same schedule; evaluate bbox and segm AP on its val split;
  4. write OUTPUT/report.md (AP table, mean ± std over seeds, CrossMAE minus MAE paired by seed, pretraining
     time, decoder GFLOPs) and PNGs: AP bars, loss curves, reconstruction grids, val images with predicted masks.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml
from detectron2.config import LazyConfig

from detection.convert import convert_checkpoint, target_from_config
from detection.datasets import dataset_files
from detection.schedule import vitdet_milestones
from pretrain.config import DEFAULTS, load_recipe, validate
from pretrain.errors import ConfigError
from pretrain.flops import count_flops
from pretrain.models import build_model
from pretrain.trainer import run as run_pretraining

from .report import write_report

ROOT = Path(__file__).resolve().parents[1]  # the source checkout: configs/ and tools/ live there
CONFIGS = ROOT / "configs"
DEMO_CONFIGS = CONFIGS / "demo"
METHODS = ("mae", "crossmae")


def log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_preset(name: str) -> dict:
    """The demo preset `configs/demo/<name>.yaml` (a plain dict)."""
    path = DEMO_CONFIGS / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"no demo preset {path}; pick one of {', '.join(presets())}")
    return yaml.safe_load(path.read_text())


def presets() -> list[str]:
    """Names of the shipped demo presets."""
    return sorted(p.stem for p in DEMO_CONFIGS.glob("*.yaml"))


def pretrain_config(method: str, size: dict, run_dir: Path, seed: int) -> dict:
    """The validated pretraining config of `method` at `size`: its CPU recipe with the size's overrides."""
    recipe = load_recipe(CONFIGS / "pretrain" / f"{method}_vit_tiny_cpu.yaml")
    cfg = {**DEFAULTS, **recipe, "num_workers": 2, **size["pretrain"], "model": f"{method}_{size['model']}",
           "output_dir": str(run_dir), "seed": seed, "resume": "auto"}
    if method == "crossmae":
        cfg["prediction_ratio"] = size["crossmae_prediction_ratio"]
    validate(cfg)
    return cfg


def _settings(cfg: dict) -> dict:
    """What a run's results depend on, in JSON form: its config without where it was written."""
    return json.loads(json.dumps({k: v for k, v in cfg.items() if k not in ("output_dir", "resume")}))


def _check_reusable(run_dir: Path, stored: dict, wanted: dict) -> None:
    """Refuse to reuse a finished step that was made with other settings (or by an older demo)."""
    if stored == wanted:
        return
    def show(old, new) -> str:
        if isinstance(old, list) and isinstance(new, list):  # override lists: only the items that differ
            old, new = [x for x in old if x not in new], [x for x in new if x not in old]
        return f"{old} -> {new}"

    diff = [f"{k}: {show(stored.get(k, 'not recorded'), wanted.get(k))}" for k in sorted(wanted)
            if stored.get(k) != wanted.get(k)]
    raise ConfigError(f"{run_dir} was made with other settings than this run ({'; '.join(diff)[:300]}); "
                     "start over with --fresh or write to another --output")


def pretrain(method: str, size: dict, out: Path, seed: int) -> dict:
    """Run (or reuse) one pretraining; returns {"time_s", "final_loss", "checkpoint"}."""
    run_dir = out / "pretrain" / method
    summary = run_dir / "summary.json"
    cfg = pretrain_config(method, size, run_dir, seed)
    if summary.is_file():
        info = json.loads(summary.read_text())
        _check_reusable(run_dir, _settings(info.get("config", {})), _settings(cfg))
        log(f"pretrain {method} (seed {seed}): done before, reusing {run_dir}")
        return info
    log(f"pretrain {method} (seed {seed}): {cfg['model']}, {cfg['epochs']} epochs on {cfg['builtin_size']} built-in images")
    t0 = time.time()
    result = run_pretraining(cfg)
    elapsed = time.time() - t0
    losses = [e["loss"] for e in result["epochs"]]
    info = {"time_s": elapsed, "final_loss": losses[-1] if losses else None,
            "checkpoint": str(run_dir / "checkpoint-last.pth"), "config": cfg}
    summary.write_text(json.dumps(info, indent=2))
    return info


def decoder_gflops(method: str, size: dict) -> float:
    """Decoder GFLOPs per image (fvcore) of the pretraining model, at its input size."""
    extra = dict(size["pretrain"].get("model_kwargs", {}))
    if "decoder_depth" in size["pretrain"]:
        extra["decoder_depth"] = size["pretrain"]["decoder_depth"]
    if method == "crossmae":
        extra["prediction_ratio"] = size["crossmae_prediction_ratio"]
    model = build_model(f"{method}_{size['model']}", img_size=size["pretrain"]["input_size"], **extra)
    imgs = torch.zeros(1, 3, size["pretrain"]["input_size"], size["pretrain"]["input_size"])
    noise = torch.rand(1, model.patchify(imgs).shape[1], generator=torch.Generator().manual_seed(0))
    return count_flops(model, imgs, noise)["decoder"]


def convert(method: str, ckpt: str, out: Path, size: dict) -> Path:
    """Pretraining checkpoint -> detectron2 checkpoint with backbone.net.* keys, checked against the detector
    that `size` fine-tunes (its config with the demo's overrides)."""
    target = out / "pretrain" / method / "d2_init.pth"
    if not target.is_file():
        shape = target_from_config(DEMO_CONFIGS / size["det_config"],
                                   det_overrides(size, size["pretrain"]["input_size"]))
        used, ignored = convert_checkpoint(ckpt, target, shape)
        log(f"convert {method}: {len(used)} encoder tensors kept, {len(ignored)} decoder/other keys dropped")
    return target


def schedule_overrides(size: dict) -> list[str]:
    """train_net overrides that fit the detection schedule to `size["det_iters"]` iterations.

    The configs place the learning-rate steps for their own `train.max_iter`; a shorter run would never reach
    them. With "det_steps", the two drops (x0.1 each) land at 8/9 and 26/27 of the run, ViTDet's positions,
    after a warm-up of at most 25 iterations. Evaluation runs once, after the last iteration.
    """
    iters = size["det_iters"]
    overrides = [f"train.max_iter={iters}", "train.eval_period=0"]
    if size.get("det_steps"):
        milestones = vitdet_milestones(iters)
        overrides += [f"lr_multiplier.scheduler.milestones={milestones}",
                      f"lr_multiplier.scheduler.num_updates={iters}",
                      f"lr_multiplier.warmup_length={min(25, iters // 10) / iters}"]
    return overrides


def det_overrides(size: dict, pretrain_img: int) -> list[str]:
    """train_net overrides of `size` over its detection config: schedule, backbone shape, device."""
    return [*schedule_overrides(size), f"model.backbone.net.pretrain_img_size={pretrain_img}", *size["det_overrides"]]


def finetune(name: str, init: Path | None, run_dir: Path, size: dict, seed: int, pretrain_img: int) -> dict:
    """Mask R-CNN on the built-in shapes through tools/train_net.py into `run_dir`; returns its ap.json."""
    ap = run_dir / "ap.json"
    settings = {"config": size["det_config"], "init": "pretrained" if init else "random", "seed": seed,
                "overrides": det_overrides(size, pretrain_img)}
    if ap.is_file():
        result = json.loads(ap.read_text())
        _check_reusable(run_dir, result.get("settings", {}), settings)
        log(f"detection {name} (seed {seed}): done before, reusing {run_dir}")
        return result
    cmd = [sys.executable, str(ROOT / "tools" / "train_net.py"), "--config-file", str(DEMO_CONFIGS / size["det_config"]),
           f"train.output_dir={run_dir}", f"train.init_checkpoint={init or ''}", f"train.seed={seed}",
           f"dataloader.evaluator.output_dir={run_dir / 'inference'}", *settings["overrides"]]
    log(f"detection {name} (seed {seed}): {size['det_iters']} iterations from {init or 'random initialisation'}")
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    result = json.loads(ap.read_text())
    result["time_s"] = time.time() - t0
    result["settings"] = settings
    ap.write_text(json.dumps(result, indent=2))
    return result


def val_files(size: dict) -> tuple[str, str]:
    """COCO json and image folder of the detection config's val split (as train_net saw them)."""
    cfg = LazyConfig.load(str(DEMO_CONFIGS / size["det_config"]))  # registers the built-in sets
    return dataset_files(cfg.dataloader.test.dataset.names)


def run(output: str | Path = "demo_output", preset: str = "tiny", seeds: Sequence[int] = (0,),
        pretrain_epochs: int | None = None, det_iters: int | None = None, fresh: bool = False) -> str:
    """Run the demo (see the module docstring); returns the report's markdown."""
    seeds = list(seeds)
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {' '.join(map(str, seeds))} repeats a seed; give distinct seeds")
    size = load_preset(preset)
    if pretrain_epochs:
        size["pretrain"]["epochs"] = pretrain_epochs
        size["pretrain"]["warmup_epochs"] = min(size["pretrain"]["warmup_epochs"], pretrain_epochs)
    if det_iters:
        size["det_iters"] = det_iters
    schedule_overrides(size)  # a bad --det-iters fails here, not after pretraining
    out = Path(output).resolve()  # summaries store checkpoint paths: valid from any working directory
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    gflops = {m: decoder_gflops(m, size) for m in METHODS}
    names = {"random init": None, "MAE": "mae", "CrossMAE": "crossmae"}
    results: dict[str, list[dict]] = {n: [] for n in names}
    run_dirs: dict[str, list[Path]] = {n: [] for n in names}
    pre: dict[str, list[dict]] = {m: [] for m in METHODS}
    for seed in seeds:
        seed_out = out / f"seed{seed}"
        for m in METHODS:
            pre[m].append(pretrain(m, size, seed_out, seed))
        inits = {m: convert(m, pre[m][-1]["checkpoint"], seed_out, size) for m in METHODS}
        for name, method in names.items():
            run_dir = seed_out / "detection" / (method or "random_init")
            results[name].append(finetune(name, inits.get(method), run_dir, size, seed,
                                          size["pretrain"]["input_size"]))
            run_dirs[name].append(run_dir)

    gt_json, image_root = val_files(size)
    return write_report(out, results, run_dirs, pre, gflops, size, seeds, time.time() - t_start, gt_json,
                        image_root)


