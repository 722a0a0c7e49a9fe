"""The whole path on one machine: does a CrossMAE backbone detect and segment as well as an MAE one, for less
pretraining compute?

Per seed, into OUTPUT/seed<S>/, every step reused when its output exists (rerun to continue after an
interruption, or with more seeds to add runs; --fresh starts over):
  1. self-pretraining: MAE, then CrossMAE, on the detection set's own train images (labels unused), same images,
     data order, optimizer steps and absolute learning rate, and the same step-0 encoder (CrossMAE starts from
     MAE's step-0 weights); weights-only snapshots along the way, step 0 included;
  2. transfer against compute: every snapshot's frozen encoder on the object probe (k-NN and linear, the spatial
     token grid of each ground-truth box crop) and its held-out reconstruction loss, against pretraining FLOPs
     and wall time;
  3. Mask R-CNN fine-tuned from each final encoder, from the step-0 encoder (the matched control: the very
     weights both pretrainings started from, converted the same way) and from ViTDet's random init (a second
     control); optionally also with the backbone frozen;
  4. OUTPUT/report.md and report.json (every metric per seed, mean ± std, differences paired by seed) and PNGs.

A preset (configs/demo/<name>.yaml) holds every setting; `--budget NAME` merges the preset's `budgets: NAME:`
over it, and writes to OUTPUT/<budget>/ unless --output says otherwise.
"""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from detectron2.config import LazyConfig
from torch.utils.data import TensorDataset

from detection.convert import convert_checkpoint, target_from_config
from detection.datasets import dataset_files
from detection.schedule import vitdet_milestones
from pretrain.config import DEFAULTS, create_model, load_recipe, validate
from pretrain.data import ImageFiles, mask_noise
from pretrain.errors import ConfigError
from pretrain.flops import count_flops
from pretrain.probe import ObjectCrops, accuracy, extract_features, knn_classify, linear_probe
from pretrain.trainer import run as run_pretraining
from pretrain.weights import load_encoder, load_pretrain_model

from .report import write_report

ROOT = Path(__file__).resolve().parents[1]  # the source checkout: configs/ and tools/ live there
CONFIGS = ROOT / "configs"
DEMO_CONFIGS = CONFIGS / "demo"
METHODS = ("mae", "crossmae")
NAMES = {"mae": "MAE", "crossmae": "CrossMAE"}
CONTROLS = {"step0": "not pretrained (step 0)", "vitdet_random": "ViTDet random init"}


def log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def presets() -> list[str]:
    """Names of the shipped demo presets."""
    return sorted(p.stem for p in DEMO_CONFIGS.glob("*.yaml"))


def _merge(base: dict, over: dict) -> dict:
    """Recursive dict merge: `over` wins, nested dicts merge key by key."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_preset(name: str, budget: str | None = None) -> dict[str, Any]:
    """The demo preset `configs/demo/<name>.yaml`, with `budgets: <budget>:` merged over it.

    Raises:
        ConfigError: no such preset or budget.
    """
    path = DEMO_CONFIGS / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"no demo preset {path}; pick one of {', '.join(presets())}")
    preset = yaml.safe_load(path.read_text())
    budgets = preset.pop("budgets", {}) or {}
    if budget is not None:
        if budget not in budgets:
            raise ConfigError(f"preset {name} has no budget {budget!r}; it has {', '.join(budgets) or 'none'}")
        preset = _merge(preset, budgets[budget])
    preset["name"], preset["budget"] = name, budget or "default"
    return preset


# ----------------------------------------------------------------------------------------------- data

def detection_sets(preset: dict) -> dict[str, tuple[str, str]]:
    """{"train": (json, image folder), "val": (...)} of the detection config's datasets, rendered if needed."""
    cfg = LazyConfig.load(str(DEMO_CONFIGS / preset["detection"]["config"]))  # registers the built-in sets
    names = {"train": cfg.dataloader.train.dataset.names, "val": cfg.dataloader.test.dataset.names}
    return {split: dataset_files(name if isinstance(name, str) else name[0]) for split, name in names.items()}


def _images_of(json_file: str, image_root: str) -> list[Path]:
    coco = json.loads(Path(json_file).read_text())
    return [Path(image_root) / im["file_name"] for im in sorted(coco["images"], key=lambda im: im["id"])]


def pretraining_folder(sets: dict[str, tuple[str, str]], out: Path) -> Path:
    """A folder of links to the detection train split's images (labels unused): pretraining's `data_path`."""
    folder = out / "pretrain_images"
    if not folder.is_dir():
        staging = out / ".pretrain_images"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for i, path in enumerate(_images_of(*sets["train"])):
            (staging / f"{i:06d}{path.suffix}").symlink_to(path.resolve())
        staging.rename(folder)
    return folder


# ----------------------------------------------------------------------------------------------- pretraining

def pretrain_config(method: str, preset: dict, run_dir: Path, seed: int, data_path: str | Path,
                    init_from: str | Path | None = None) -> dict:
    """The validated pretraining config of `method`: its CPU recipe with the preset's overrides.

    Both methods get the same absolute learning rate (`lr_prediction_scale: none`): the demo compares methods,
    not the released trainer's rule that scales CrossMAE's rate by prediction ratio / mask ratio.
    """
    recipe = load_recipe(CONFIGS / "pretrain" / f"{method}_vit_tiny_cpu.yaml")
    cfg = {**DEFAULTS, **recipe, **preset["pretrain"], "model": f"{method}_{preset['model']}",
           "data_path": str(data_path), "output_dir": str(run_dir), "seed": seed, "resume": "auto",
           "lr_prediction_scale": "none", "init_from": str(init_from or "")}
    if method == "crossmae":
        cfg["prediction_ratio"] = preset["crossmae_prediction_ratio"]
    validate(cfg)
    return cfg


def _settings(cfg: dict, drop: Sequence[str] = ("output_dir", "resume")) -> dict:
    """What a step's results depend on, in JSON form: its config without where it was written."""
    return json.loads(json.dumps({k: v for k, v in cfg.items() if k not in drop}))


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


def pretrain(method: str, preset: dict, seed_out: Path, seed: int, data_path: Path,
             init_from: Path | None = None) -> dict:
    """Run (or reuse, or resume) one pretraining; returns {"time_s", "final_loss", "run_dir", "config"}.

    The trainer's per-epoch log lines go to RUN_DIR/train.log; the console gets one line.
    """
    run_dir = seed_out / "pretrain" / method
    summary = run_dir / "summary.json"
    cfg = pretrain_config(method, preset, run_dir, seed, data_path, init_from)
    wanted = _settings(cfg, drop=("output_dir", "resume", "init_from", "data_path"))
    if summary.is_file():
        info = json.loads(summary.read_text())
        _check_reusable(run_dir, _settings(info["config"], drop=("output_dir", "resume", "init_from", "data_path")),
                        wanted)
        log(f"pretrain {NAMES[method]} (seed {seed}): done before, reusing {run_dir}")
        return info
    steps = cfg["epochs"] * (len(_images(data_path)) // cfg["batch_size"])
    log(f"pretrain {NAMES[method]} (seed {seed}): {cfg['model']}, {steps} steps of {cfg['batch_size']} images"
        + (f", from the encoder of {init_from.name}" if init_from else ""))
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    trainer_log = logging.getLogger("pretrain")
    trainer_log.addHandler(handler)
    trainer_log.setLevel(logging.INFO)
    trainer_log.propagate = False
    try:
        t0 = time.time()
        result = run_pretraining(cfg)
        elapsed = time.time() - t0
    finally:
        trainer_log.removeHandler(handler)
        handler.close()
    records = [json.loads(line) for line in (run_dir / "log.txt").read_text().splitlines()]
    info = {"time_s": sum(r["train_epoch_time_s"] for r in records), "wall_s": elapsed,
            "final_loss": records[-1]["train_loss"], "steps": steps, "run_dir": str(run_dir), "config": cfg,
            "epochs_this_call": len(result["epochs"])}
    summary.write_text(json.dumps(info, indent=2))
    return info


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if p.is_file() or p.is_symlink())


def forward_gflops(method: str, preset: dict) -> dict[str, float]:
    """fvcore GFLOPs (1 multiply-add = 1 FLOP) of one pretraining forward per image: encoder, decoder, total."""
    cfg = pretrain_config(method, preset, Path("unused"), 0, "unused")
    model = create_model(cfg)
    size = cfg["input_size"]
    imgs = torch.zeros(1, 3, size, size)
    noise = torch.rand(1, model.num_patches, generator=torch.Generator().manual_seed(0))
    return count_flops(model, imgs, noise)


# ----------------------------------------------------------------------------------------------- the curves

def probe_sets(sets: dict[str, tuple[str, str]], input_size: int) -> dict[str, TensorDataset]:
    """The object crops of both splits, decoded once into memory (the curves evaluate them many times)."""
    out = {}
    for split, (json_file, root) in sets.items():
        crops = ObjectCrops(json_file, root, input_size)
        images = torch.stack([crops[i][0] for i in range(len(crops))])
        out[split] = TensorDataset(images, crops.labels)
        out[split].labels, out[split].classes = crops.labels, crops.classes
    return out


@torch.no_grad()
def heldout_loss(snapshot: Path, files: Sequence[Path], seed: int = 0) -> float:
    """Reconstruction loss of a snapshot on held-out images with fixed masks, over every masked patch.

    CrossMAE predicts every masked patch here (prediction ratio = mask ratio; its queries are independent), so
    both methods are scored on the same patches of the same images.
    """
    model, _ = load_pretrain_model(snapshot)  # CrossMAE: prediction ratio defaults to the mask ratio
    images = ImageFiles(files, model.patch_embed.img_size[0])
    imgs = torch.stack([images[i][0] for i in range(len(images))])
    noise = mask_noise(range(len(images)), model.num_patches, seed)
    return float(model(imgs, noise=noise).loss)


def evaluate_snapshot(snapshot: Path, probes: dict[str, TensorDataset], val_files: Sequence[Path],
                      probe_cfg: dict) -> dict[str, float]:
    """Object-probe accuracies (k-NN, linear) and held-out reconstruction loss of one snapshot's encoder."""
    encoder, _ = load_encoder(snapshot)
    train = extract_features(encoder, probes["train"], probe_cfg["block"], probe_cfg["pool"], desc="probe features")
    val = extract_features(encoder, probes["val"], probe_cfg["block"], probe_cfg["pool"], desc="probe features")
    n = len(probes["train"].classes)
    knn = knn_classify(train, probes["train"].labels, val, n, probe_cfg["k"], probe_cfg["temperature"])
    linear = linear_probe(train, probes["train"].labels, val, n, epochs=probe_cfg["epochs"], blr=probe_cfg["blr"],
                          batch_size=probe_cfg["batch_size"], warmup_epochs=probe_cfg["warmup_epochs"])
    return {"knn": accuracy(knn, probes["val"].labels), "linear": accuracy(linear, probes["val"].labels),
            "heldout_loss": heldout_loss(snapshot, val_files)}


def curve(method: str, info: dict, probes: dict[str, TensorDataset], val_files: Sequence[Path], preset: dict,
          gflops: dict[str, float]) -> list[dict[str, float]]:
    """One point per snapshot: step, pretraining compute (training FLOPs = 3 x forward, all images so far) and wall
    time so far, and the snapshot's probe accuracies and held-out loss. Points are cached in RUN_DIR/curve.json."""
    run_dir = Path(info["run_dir"])
    cache_file = run_dir / "curve.json"
    cached = {p["snapshot"]: p for p in json.loads(cache_file.read_text())} if cache_file.is_file() else {}
    records = [json.loads(line) for line in (run_dir / "log.txt").read_text().splitlines()]
    elapsed = np.cumsum([0.0] + [r["train_epoch_time_s"] for r in records])
    batch = info["config"]["batch_size"]
    points = []
    for snap in sorted((run_dir / "snapshots").glob("step-*.pth")):
        if snap.name not in cached:
            meta = torch.load(snap, map_location="cpu", weights_only=True)
            epoch, step = int(meta["epoch"]), int(meta["step"])
            cached[snap.name] = {"snapshot": snap.name, "step": step, "epoch": epoch,
                                 "pretrain_tflops": 3 * gflops["total"] * batch * step / 1e3,
                                 "pretrain_s": float(elapsed[epoch + 1]),
                                 **evaluate_snapshot(snap, probes, val_files, preset["probe"])}
            cache_file.write_text(json.dumps(sorted(cached.values(), key=lambda p: p["step"]), indent=1))
        points.append(cached[snap.name])
    log(f"curve {NAMES[method]}: " + ", ".join(f"step {p['step']} k-NN {p['knn']:.2f} linear {p['linear']:.2f}"
                                               for p in points))
    return points


# ----------------------------------------------------------------------------------------------- detection

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


def finetune(key: str, init: Path | None, run_dir: Path, preset: dict, seed: int, frozen: bool = False) -> dict:
    """Mask R-CNN through tools/train_net.py into `run_dir` (its output in RUN_DIR/train_net.log; an interrupted
    run resumes from its last checkpoint); returns ap.json with the time and settings it was made with."""
    ap = run_dir / "ap.json"
    settings = {"config": preset["detection"]["config"], "init": key, "seed": seed, "frozen": frozen,
                "overrides": det_overrides(preset, frozen)}
    label = (CONTROLS.get(key) or NAMES[key]) + (", frozen backbone" if frozen else "")
    if ap.is_file():
        result = json.loads(ap.read_text())
        _check_reusable(run_dir, result.get("settings", {}), settings)
        log(f"detection {label} (seed {seed}): done before, reusing {run_dir}")
        return result
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
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"tools/train_net.py failed (exit {proc.returncode}) for {label}; see "
                           f"{run_dir / 'train_net.log'}")
    result = json.loads(ap.read_text())
    result.update(time_s=time.time() - t0, settings=settings)
    ap.write_text(json.dumps(result, indent=2))
    return result


# ----------------------------------------------------------------------------------------------- the run

def run(output: str | Path | None = None, preset: str = "tiny", seeds: Sequence[int] = (0,),
        budget: str | None = None, fresh: bool = False) -> str:
    """Run the demo (see the module docstring); returns the report's markdown."""
    seeds = list(seeds)
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {' '.join(map(str, seeds))} repeats a seed; give distinct seeds")
    cfg = load_preset(preset, budget)
    vitdet_milestones(cfg["detection"]["iters"])  # a schedule too short fails here, not after pretraining
    out = Path(output if output is not None else "demo_output" if budget is None else f"demo_output/{budget}")
    out = out.resolve()  # summaries store paths: valid from any working directory
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    sets = detection_sets(cfg)
    data = pretraining_folder(sets, out)
    val_files = _images_of(*sets["val"])
    probes = probe_sets(sets, cfg["pretrain"]["input_size"])
    gflops = {m: forward_gflops(m, cfg) for m in METHODS}
    runs: list[dict[str, Any]] = []
    for seed in seeds:
        seed_out = out / f"seed{seed}"
        pre = {"mae": pretrain("mae", cfg, seed_out, seed, data)}
        step0 = Path(pre["mae"]["run_dir"]) / "snapshots" / "step-0000000.pth"
        pre["crossmae"] = pretrain("crossmae", cfg, seed_out, seed, data, init_from=step0)
        curves = {m: curve(m, pre[m], probes, val_files, cfg, gflops[m]) for m in METHODS}
        inits = {"vitdet_random": None, "step0": convert(step0, seed_out / "pretrain" / "d2_step0.pth", cfg)}
        for m in METHODS:
            last = sorted((Path(pre[m]["run_dir"]) / "snapshots").glob("step-*.pth"))[-1]
            inits[m] = convert(last, seed_out / "pretrain" / f"d2_{m}.pth", cfg)
        detection = {}
        for frozen in ([False, True] if cfg["detection"].get("frozen") else [False]):
            for key, init in inits.items():
                if frozen and init is None:
                    continue  # a frozen random backbone says nothing about pretraining
                name = key + ("_frozen" if frozen else "")
                detection[name] = finetune(key, init, seed_out / "detection" / name, cfg, seed, frozen)
        runs.append({"seed": seed, "pretrain": pre, "curves": curves, "detection": detection,
                     "seed_dir": str(seed_out)})
    return write_report(out, cfg, runs, gflops, sets, time.time() - t_start)
