"""The demo's pretrainings: each method's config from its CPU recipe and the preset, the shared step-0 encoder
both start from, a run (reused when finished with the same settings, resumed when interrupted), and the
forward FLOPs per image of each method."""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from pretrain.evaluation.flops import count_flops
from pretrain.files import save_atomic, write_json_atomic
from pretrain.models import create_model
from pretrain.training.config import DEFAULTS, load_recipe, validate
from pretrain.training.run_folder import read_log
from pretrain.training.trainer import seed_epoch
from pretrain.training.trainer import run as run_pretraining

from .data import folder_images
from .labels import NAMES, log
from .presets import CONFIGS
from .reuse import check_reusable, read_own, settings_of

__all__ = ["pretrain_config", "step0_encoder", "finished_pretraining", "pretrain", "forward_gflops"]


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
        stored = read_own(path).get("config")
        stored = stored if isinstance(stored, dict) else {}
        check_reusable(path, {k: stored.get(k) for k in wanted}, settings_of(wanted, drop=()))
        return path
    seed_epoch(seed, -1, 0)  # the trainer's seeding before it creates the model
    save_atomic({"model": create_model(cfg).state_dict(), "step": 0, "epoch": -1, "config": cfg}, path)
    return path
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
    wanted = settings_of(pretrain_config(method, preset, run_dir, seed, data_path, init_from), drop=drop)
    info = json.loads(summary.read_text())
    check_reusable(run_dir, settings_of(info["config"], drop=drop), wanted)
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
    steps = cfg["epochs"] * (len(folder_images(data_path)) // cfg["batch_size"])
    log(f"pretrain {NAMES[method]} (seed {seed}): {cfg['model']}, {steps} steps of {cfg['batch_size']} images"
        + (f", from the encoder of {init_from.name}" if init_from else ""))
    run_dir.mkdir(parents=True, exist_ok=True)
    with _trainer_log_to(run_dir / "train.log"):
        t0 = time.time()
        result = run_pretraining(cfg)
        elapsed = time.time() - t0
    records = read_log(run_dir)
    info = {"time_s": sum(r["train_epoch_time_s"] for r in records), "wall_s": elapsed,
            "final_loss": records[-1]["train_loss"], "steps": steps, "run_dir": str(run_dir), "config": cfg,
            "epochs_this_call": len(result["epochs"])}
    write_json_atomic(summary, info)
    return info


@contextmanager
def _trainer_log_to(path: Path) -> Iterator[None]:
    """Send the trainer's log records (logger "pretrain") to `path` only, for the duration of the block."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    trainer_log = logging.getLogger("pretrain")
    trainer_log.addHandler(handler)
    trainer_log.setLevel(logging.INFO)
    trainer_log.propagate = False
    try:
        yield
    finally:
        trainer_log.removeHandler(handler)
        handler.close()


def forward_gflops(method: str, preset: dict) -> dict[str, float]:
    """fvcore GFLOPs (1 multiply-add = 1 FLOP) of one pretraining forward per image: encoder, decoder, total."""
    cfg = pretrain_config(method, preset, Path("unused"), 0, "unused")
    model = create_model(cfg)
    size = cfg["input_size"]
    imgs = torch.zeros(1, 3, size, size)
    noise = torch.rand(1, model.num_patches, generator=torch.Generator().manual_seed(0))
    return count_flops(model, imgs, noise)
