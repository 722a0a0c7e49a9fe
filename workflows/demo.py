"""The whole path on one machine: does a CrossMAE backbone detect and segment as well as an MAE one, for less
pretraining compute?

Per seed, into OUTPUT/seed<S>/, every step reused when its output exists (rerun to continue after an
interruption, or with more seeds to add runs; --fresh starts over):
  1. self-pretraining: MAE and CrossMAE side by side on the detection set's own train images (labels unused),
     same images, data order, optimizer steps and absolute learning rate, and the same step-0 encoder
     (SEED/pretrain/init.pth, MAE's initial weights at this seed, written first); weights-only snapshots along
     the way, step 0 included;
  2. transfer against compute: every snapshot's frozen encoder on the object probe (k-NN and linear, the spatial
     token grid of each ground-truth box crop) and its held-out reconstruction loss, against pretraining FLOPs
     and wall time;
  3. Mask R-CNN fine-tuned from each final encoder, from the step-0 encoder (the matched control: the very
     weights both pretrainings started from, converted the same way) and from ViTDet's random init (a second
     control); optionally also with the backbone frozen;
  4. OUTPUT/report.md and report.json (every metric per seed, mean ± std, differences paired by seed) and PNGs.

A preset (configs/demo/<name>.yaml) holds every setting; `--budget NAME` merges the preset's `budgets: NAME:`
over it, and writes to OUTPUT/<budget>/ unless --output says otherwise. Steps run two at a time (`--jobs`),
each on half the threads, under one progress bar per seed; every run's own output goes to its log file.
"""
from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from detectron2.config import LazyConfig
from torch.utils.data import TensorDataset
from tqdm import tqdm

from detection.convert import convert_checkpoint, target_from_config
from detection.datasets import dataset_files
from detection.schedule import vitdet_milestones
from pretrain.checkpoint import save_atomic
from pretrain.config import DEFAULTS, create_model, load_recipe, validate
from pretrain.data import ImageFiles, mask_noise
from pretrain.errors import ConfigError
from pretrain.flops import count_flops
from pretrain.probe import ObjectCrops, accuracy, extract_features, knn_classify, linear_probe
from pretrain.trainer import run as run_pretraining
from pretrain.trainer import seed_epoch
from pretrain.weights import load_encoder, load_pretrain_model

from .report import ap_text, write_report

ROOT = Path(__file__).resolve().parents[1]  # the source checkout: configs/ and tools/ live there
CONFIGS = ROOT / "configs"
DEMO_CONFIGS = CONFIGS / "demo"
METHODS = ("mae", "crossmae")
NAMES = {"mae": "MAE", "crossmae": "CrossMAE"}
CONTROLS = {"step0": "not pretrained (step 0)", "vitdet_random": "ViTDet random init"}
DETECTOR_ORDER = ("vitdet_random", "step0", *METHODS)  # the report's rows


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


# settings the demo sets itself, which a --set would not change: trainer keys `pretrain_config` overwrites, and
# the preset's own labels; each with what to use instead
DEMO_OWNED = {"pretrain.seed": "use --seeds", "pretrain.prediction_ratio": "use crossmae_prediction_ratio",
              **dict.fromkeys(("pretrain.model", "pretrain.data_path", "pretrain.output_dir", "pretrain.resume",
                               "pretrain.lr_prediction_scale", "pretrain.init_from"), "the demo sets it per run"),
              "name": "use --size", "budget": "use --budget", "set": "the report fills it in"}
_TRAINER_OWNED = {k.removeprefix("pretrain.") for k in DEMO_OWNED if k.startswith("pretrain.")}


def _value(item: str, text: str) -> Any:
    """A YAML value, with numbers such as 8e-3 (a string to YAML 1.1) read as floats; NaN and infinity refused."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"--set {item}: {text!r} is not a YAML value") from None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return value
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"--set {item}: {text} is not a finite number")
    return value


def _same_kind(old: Any, new: Any) -> bool:
    """Whether `new` may replace the preset's `old`: the same type (an int where a float was is fine)."""
    if old is None or new is None:
        return True
    if isinstance(old, float) and isinstance(new, int) and not isinstance(new, bool):
        return True
    return type(old) is type(new)


def apply_settings(preset: dict, items: Sequence[str]) -> dict[str, Any]:
    """The preset with `KEY=VALUE` settings over it: dotted keys (`pretrain.blr=8e-3`,
    `crossmae_prediction_ratio=0.75`), YAML values. A key must exist in the preset, or, under `pretrain`, be a
    key of the trainer's config; the whole result is validated when the runs are built.

    Raises:
        ConfigError: an item is not KEY=VALUE or names no setting.
    """
    out = yaml.safe_load(yaml.safe_dump(preset))  # a deep copy
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r} is not KEY=VALUE; e.g. --set pretrain.blr=8e-3")
        if key in DEMO_OWNED:
            raise ConfigError(f"--set {item}: {key} is set by the demo itself; {DEMO_OWNED[key]}")
        *parents, leaf = key.split(".")
        node = out
        for depth, part in enumerate(parents):
            if not isinstance(node.get(part), dict):
                prefix, sections = ".".join(parents[:depth + 1]), [k for k, v in node.items() if isinstance(v, dict)]
                raise ConfigError(f"--set {item}: {prefix} is not a section of the preset (sections here: "
                                  f"{', '.join(sections) or 'none'}); set the whole mapping instead, e.g. "
                                  f"--set '{prefix}={{KEY: VALUE}}'")
            node = node[part]
        trainer = parents == ["pretrain"]
        known = set(node) | (set(DEFAULTS) - _TRAINER_OWNED if trainer else set())
        if leaf not in known:
            raise ConfigError(f"--set {item}: no setting {key}; there are: {', '.join(sorted(known))}")
        value = _value(item, text)
        old = node.get(leaf, DEFAULTS.get(leaf) if trainer else None)
        if not _same_kind(old, value):
            raise ConfigError(f"--set {item}: {key} is {type(old).__name__} ({old!r} now), not {type(value).__name__}")
        node[leaf] = value
    if items:
        out["set"] = list(items)
    return out


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


def step0_encoder(preset: dict, seed_out: Path, seed: int) -> Path:
    """The step-0 weights both pretrainings start from (`init_from`), written once per seed: the MAE model as
    the trainer would create it at this seed. Both runs can then start at once, side by side."""
    path = seed_out / "pretrain" / "init.pth"
    cfg = pretrain_config("mae", preset, seed_out / "pretrain" / "mae", seed, "unused")
    wanted = {k: cfg[k] for k in ("model", "input_size", "seed", "model_kwargs")}
    if path.is_file():  # made for another model, input size or seed: refused, not silently resampled
        stored = torch.load(path, map_location="cpu", weights_only=True)["config"]
        _check_reusable(path, {k: stored.get(k) for k in wanted}, _settings(wanted, drop=()))
        return path
    seed_epoch(seed, -1, 0)  # the trainer's seeding before it creates the model
    save_atomic({"model": create_model(cfg).state_dict(), "step": 0, "epoch": -1, "config": cfg}, path)
    return path


def _write_json(path: Path, obj: Any, indent: int = 2) -> None:
    """Write JSON atomically (temporary file, then rename): a run stopped mid-write leaves the old file or none."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=indent))
    os.replace(tmp, path)


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


def finished_pretraining(method: str, preset: dict, seed_out: Path, seed: int, data_path: Path,
                         init_from: Path | None = None) -> dict | None:
    """The summary of this pretraining if it finished before with the same settings, else None.

    Raises:
        ConfigError: it finished with other settings.
    """
    run_dir = seed_out / "pretrain" / method
    summary = run_dir / "summary.json"
    if not summary.is_file():
        return None
    drop = ("output_dir", "resume", "init_from", "data_path")
    wanted = _settings(pretrain_config(method, preset, run_dir, seed, data_path, init_from), drop=drop)
    info = json.loads(summary.read_text())
    _check_reusable(run_dir, _settings(info["config"], drop=drop), wanted)
    log(f"pretrain {NAMES[method]} (seed {seed}): done before, reusing {run_dir}")
    return info


def pretrain(method: str, preset: dict, seed_out: Path, seed: int, data_path: Path,
             init_from: Path | None = None) -> dict:
    """Run (or reuse, or resume) one pretraining; returns {"time_s", "final_loss", "run_dir", "config"}.

    The trainer's per-epoch log lines go to RUN_DIR/train.log; the console gets one line.
    """
    info = finished_pretraining(method, preset, seed_out, seed, data_path, init_from)
    if info is not None:
        return info
    run_dir = seed_out / "pretrain" / method
    summary = run_dir / "summary.json"
    cfg = pretrain_config(method, preset, run_dir, seed, data_path, init_from)
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
    _write_json(summary, info)
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
    time so far, and the snapshot's probe accuracies and held-out loss. Points are cached in RUN_DIR/curve.json with
    the probe settings they were made with; a point made with other settings (or none recorded) is evaluated again."""
    run_dir = Path(info["run_dir"])
    cache_file = run_dir / "curve.json"
    probe_cfg = dict(preset["probe"])
    cached = ({p["snapshot"]: p for p in json.loads(cache_file.read_text()) if p.get("probe") == probe_cfg}
              if cache_file.is_file() else {})
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
                                 **evaluate_snapshot(snap, probes, val_files, probe_cfg), "probe": probe_cfg}
            _write_json(cache_file, sorted(cached.values(), key=lambda p: p["step"]), indent=1)
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


def _det_settings(key: str, preset: dict, seed: int, frozen: bool) -> dict:
    return {"config": preset["detection"]["config"], "init": key, "seed": seed, "frozen": frozen,
            "overrides": det_overrides(preset, frozen)}


def _det_label(key: str, frozen: bool) -> str:
    return (CONTROLS.get(key) or NAMES[key]) + (", frozen backbone" if frozen else "")


def finished_detection(key: str, run_dir: Path, preset: dict, seed: int, frozen: bool = False) -> dict | None:
    """ap.json of this detector if it finished before with the same settings, else None.

    Raises:
        ConfigError: it finished with other settings.
    """
    ap = run_dir / "ap.json"
    if not ap.is_file():
        return None
    result = json.loads(ap.read_text())
    _check_reusable(run_dir, result.get("settings", {}), _det_settings(key, preset, seed, frozen))
    log(f"detection {_det_label(key, frozen)} (seed {seed}): done before, reusing {run_dir}")
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
    label = _det_label(key, frozen)
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
    _write_json(ap, result)
    box, mask = (result[task].get("AP") for task in ("bbox", "segm"))  # None: no detection at all
    log(f"detection {label} (seed {seed}): box AP {ap_text(box)}, mask AP {ap_text(mask)} in "
        f"{result['time_s'] / 60:.1f} min")
    return result


# ----------------------------------------------------------------------------------------------- side by side

def plan_jobs(jobs: int | None) -> tuple[int, int]:
    """(runs side by side, torch threads each). By default two runs, each on half the threads: small matrices
    scale poorly with threads, so on a 2-core CPU a single-thread pair gets through more work per minute than
    one run at two threads (see the README's Demo section for the step times seen on one such machine)."""
    threads = torch.get_num_threads()
    if jobs is None:
        jobs = 2 if threads >= 2 else 1
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs}: give 1 (one run at a time) or more")
    return jobs, max(1, threads // jobs)


def _exit_on_sigterm(*_: Any) -> None:
    raise SystemExit(143)


def _worker_init() -> None:
    """Pool workers turn SIGTERM into SystemExit, so that a detector's `subprocess.run` kills its train_net."""
    signal.signal(signal.SIGTERM, _exit_on_sigterm)


def _in_worker(threads: int, stderr_file: str, fn: Callable, *args: Any) -> Any:
    """fn(*args) in a worker process at `threads` torch threads. Its stderr (warnings, and the progress bars,
    which tqdm then does not draw) goes to `stderr_file`; its one-line console messages still reach stdout."""
    torch.set_num_threads(threads)
    Path(stderr_file).parent.mkdir(parents=True, exist_ok=True)
    saved = os.dup(2)
    with open(stderr_file, "a") as f:
        os.dup2(f.fileno(), 2)
        try:
            return fn(*args)
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


class Task:
    """One step of a seed's run: `make(results)` -> (fn, args) once the tasks named in `after` are done (the
    args can depend on their results); `finished` is its reused result, checked before anything runs."""

    def __init__(self, name: str, make: Callable[[dict], tuple[Callable, tuple]], after: Sequence[str] = (),
                 finished: Any = None) -> None:
        self.name, self.make, self.after, self.finished = name, make, tuple(after), finished


def run_tasks(tasks: Sequence[Task], pool: ProcessPoolExecutor | None, slots: int, threads: int, log_dir: Path,
              progress: Callable[[], tuple[int, str]], total: int, desc: str) -> dict[str, Any]:
    """Run the tasks, in list order as their dependencies allow, as many at a time as `pool` has workers (one
    at a time in this process when `pool` is None) up to `slots` at once, under one progress bar; the first
    failure stops the rest.

    `progress()` gives (work units done, a status line); `total` is the units of all tasks.
    """
    results = {t.name: t.finished for t in tasks if t.finished is not None}
    todo = [t for t in tasks if t.finished is None]
    bar = tqdm(total=total, desc=desc, unit="step", disable=None if pool is not None else True, leave=False)
    running: dict[Future, str] = {}
    try:
        while todo or running:
            for task in list(todo):
                if len(running) >= slots:
                    break
                if all(name in results for name in task.after):
                    todo.remove(task)
                    fn, args = task.make(results)
                    if pool is None:
                        results[task.name] = fn(*args)
                        continue
                    running[pool.submit(_in_worker, threads, str(log_dir / f"{task.name}.stderr"), fn,
                                        *args)] = task.name
            if not running:
                if todo and not any(all(n in results for n in t.after) for t in todo):
                    raise RuntimeError(f"demo tasks {[t.name for t in todo]} wait on tasks that never ran")
                continue
            done, _ = wait(running, timeout=2.0, return_when=FIRST_COMPLETED)
            units, status = progress()
            bar.update(max(0, min(total, units) - bar.n))
            bar.set_postfix_str(status, refresh=False)
            for future in [f for f in list(running) if f in done]:
                name = running.pop(future)
                error = future.exception()
                if error is not None:
                    for other in running:
                        other.cancel()
                    error.add_note(f"(demo step {name}; its log: {log_dir / (name + '.stderr')})")
                    raise error
                results[name] = future.result()
    finally:
        bar.close()
    return results


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


_PROBES: dict[tuple, dict[str, TensorDataset]] = {}


def _curve_task(method: str, info: dict, sets: dict[str, tuple[str, str]], preset: dict,
                gflops: dict[str, float]) -> list[dict[str, float]]:
    """`curve` in a worker process, which decodes the object crops itself (cheaper than sending them)."""
    key = (json.dumps(sets, sort_keys=True), preset["pretrain"]["input_size"])
    if key not in _PROBES:
        _PROBES[key] = probe_sets(sets, preset["pretrain"]["input_size"])
    return curve(method, info, _PROBES[key], _images_of(*sets["val"]), preset, gflops)


# ----------------------------------------------------------------------------------------------- the run

def run_seed(cfg: dict, seed_out: Path, seed: int, data: Path, sets: dict[str, tuple[str, str]],
             gflops: dict[str, dict[str, float]], pool: ProcessPoolExecutor | None, jobs: int,
             threads: int) -> dict[str, Any]:
    """One seed: both pretrainings, their curves, and the detectors, scheduled on the pool's workers.

    The order keeps both workers busy to the end: MAE's pretraining (the longest run) beside a control detector
    (the controls need only the step-0 encoder) and then CrossMAE's pretraining, each method's curve and
    detector as soon as its pretraining ends, the other control last; run both pretrainings first instead, and
    the last detector runs alone while the other worker idles.
    """
    init = step0_encoder(cfg, seed_out, seed)
    per_epoch = len(_images(data)) // cfg["pretrain"]["batch_size"]
    steps = per_epoch * cfg["pretrain"]["epochs"]
    iters = cfg["detection"]["iters"]
    inits: dict[str, Path | None] = {"vitdet_random": None,
                                     "step0": convert(init, seed_out / "pretrain" / "d2_step0.pth", cfg)}
    detectors = [(key + ("_frozen" if frozen else ""), key, frozen)  # in the report's order
                 for frozen in ([False, True] if cfg["detection"].get("frozen") else [False])
                 for key in DETECTOR_ORDER
                 if not (frozen and key == "vitdet_random")]  # a frozen random backbone says nothing of pretraining
    det_dirs = {name: seed_out / "detection" / name for name, _, _ in detectors}

    def final_weights(method: str, results: dict) -> Path:
        last = sorted((Path(results[f"pretrain_{method}"]["run_dir"]) / "snapshots").glob("step-*.pth"))[-1]
        return convert(last, seed_out / "pretrain" / f"d2_{method}.pth", cfg)

    tasks = [Task(f"pretrain_{m}", lambda r, m=m: (pretrain, (m, cfg, seed_out, seed, data, init)),
                  finished=finished_pretraining(m, cfg, seed_out, seed, data, init)) for m in METHODS]
    tasks += [Task(f"curve_{m}", lambda r, m=m: (_curve_task, (m, r[f"pretrain_{m}"], sets, cfg, gflops[m])),
                   after=[f"pretrain_{m}"]) for m in METHODS]
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
            "detection": {name: results[f"detection_{name}"] for name, _, _ in detectors},
            "seed_dir": str(seed_out)}


def run(output: str | Path | None = None, preset: str = "tiny", seeds: Sequence[int] = (0,),
        budget: str | None = None, fresh: bool = False, jobs: int | None = None, settings: Sequence[str] = ()) -> str:
    """Run the demo (see the module docstring); returns the report's markdown.

    `jobs` runs side by side (default `plan_jobs`): the two pretrainings, the two curves and the detectors run
    that many at a time, each on its share of the threads. Results do not depend on it beyond the run-to-run
    spread of multi-threaded float sums. `settings` are `KEY=VALUE` items over the preset (`apply_settings`).
    """
    seeds = list(seeds)
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {' '.join(map(str, seeds))} repeats a seed; give distinct seeds")
    cfg = apply_settings(load_preset(preset, budget), settings)
    vitdet_milestones(cfg["detection"]["iters"])  # a schedule too short fails here, not after pretraining
    jobs, threads = plan_jobs(jobs)
    out = Path(output if output is not None else "demo_output" if budget is None else f"demo_output/{budget}")
    out = out.resolve()  # summaries store paths: valid from any working directory
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    sets = detection_sets(cfg)
    data = pretraining_folder(sets, out)
    gflops = {m: forward_gflops(m, cfg) for m in METHODS}
    log(f"{jobs} run(s) at a time, {threads} thread(s) each" + ("; --jobs 1 runs one at a time" if jobs > 1 else ""))
    pool = (ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init)
            if jobs > 1 else None)
    runs: list[dict[str, Any]] = []
    main_thread = threading.current_thread() is threading.main_thread()
    # a `kill` or `timeout` stops the workers too (signal handlers can only be set from the main thread)
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if main_thread else None
    try:
        for seed in seeds:
            runs.append(run_seed(cfg, out / f"seed{seed}", seed, data, sets, gflops, pool, jobs, threads))
    except BaseException:
        if pool is not None:  # a failed or interrupted run stops the rest: atomic writes, train_net killed too
            for proc in list((getattr(pool, "_processes", None) or {}).values()):
                proc.terminate()
        raise
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    cfg["parallel"] = {"jobs": jobs, "threads": threads}
    return write_report(out, cfg, runs, gflops, sets, time.time() - t_start)
