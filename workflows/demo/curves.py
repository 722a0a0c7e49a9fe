"""Transfer against compute: every snapshot of a pretraining on the object probe (k-NN and linear on the spatial
token grid of each ground-truth box crop) and its held-out reconstruction loss, against pretraining FLOPs and
wall time."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from pretrain.data.images import ImageFiles, mask_noise
from pretrain.evaluation.features import extract_features
from pretrain.evaluation.health import encoder_health
from pretrain.evaluation.probe import HEALTH_SAMPLES, score_features
from pretrain.files import write_json_atomic
from pretrain.training.run_folder import read_log
from pretrain.weights.loading import load_encoder, load_pretrain_model

from .data import images_of, probe_sets
from .labels import NAMES, log
from .reuse import read_own

__all__ = ["heldout_loss", "evaluate_snapshot", "curve", "curve_task"]


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
    """Object-probe accuracies (k-NN, linear), held-out reconstruction loss, and the feature health of the probed
    block over the val objects (`pretrain.evaluation.health.token_stats`) of one snapshot's encoder."""
    encoder, _ = load_encoder(snapshot)
    train, val = (extract_features(encoder, probes[split], probe_cfg["block"], probe_cfg["pool"],
                                   desc="probe features") for split in ("train", "val"))
    scores = score_features(train, probes["train"].labels, val, probes["val"].labels, len(probes["train"].classes),
                            k=probe_cfg["k"], temperature=probe_cfg["temperature"], epochs=probe_cfg["epochs"],
                            blr=probe_cfg["blr"], batch_size=probe_cfg["batch_size"],
                            warmup_epochs=probe_cfg["warmup_epochs"])
    block = 1 + probe_cfg["block"] % len(encoder.blocks)  # maps: the embedded input, then each block
    health = encoder_health(encoder, probes["val"].tensors[0][:HEALTH_SAMPLES], blocks=[block])[0]
    return {**scores, "heldout_loss": heldout_loss(snapshot, val_files), "health": health}


def curve(method: str, info: dict, probes: dict[str, TensorDataset], val_files: Sequence[Path], preset: dict,
          gflops: dict[str, float]) -> list[dict[str, float]]:
    """One point per snapshot: step, pretraining compute (training FLOPs = 3 x forward, all images so far) and wall
    time so far, and the snapshot's probe accuracies, held-out loss and feature health. Points are cached in
    RUN_DIR/curve.json with the probe settings they were made with; a point made with other settings (or none
    recorded, or no feature health) is evaluated again."""
    run_dir = Path(info["run_dir"])
    cache_file = run_dir / "curve.json"
    probe_cfg = dict(preset["probe"])
    cached = ({p["snapshot"]: p for p in json.loads(cache_file.read_text())
               if p.get("probe") == probe_cfg and "health" in p} if cache_file.is_file() else {})
    records = read_log(run_dir)
    elapsed = np.cumsum([0.0] + [r["train_epoch_time_s"] for r in records])
    batch = info["config"]["batch_size"]
    points = []
    for snap in sorted((run_dir / "snapshots").glob("step-*.pth")):
        if snap.name not in cached:
            meta = read_own(snap)
            epoch, step = int(meta["epoch"]), int(meta["step"])
            cached[snap.name] = {"snapshot": snap.name, "step": step, "epoch": epoch,
                                 "pretrain_tflops": 3 * gflops["total"] * batch * step / 1e3,
                                 "pretrain_s": float(elapsed[epoch + 1]),
                                 **evaluate_snapshot(snap, probes, val_files, probe_cfg), "probe": probe_cfg}
            write_json_atomic(cache_file, sorted(cached.values(), key=lambda p: p["step"]), indent=1)
        points.append(cached[snap.name])
    log(f"curve {NAMES[method]}: " + ", ".join(f"step {p['step']} k-NN {p['knn']:.2f} linear {p['linear']:.2f}"
                                               for p in points))
    return points



_PROBES: dict[tuple, dict[str, TensorDataset]] = {}


def curve_task(method: str, info: dict, sets: dict[str, tuple[str, str]], preset: dict,
                gflops: dict[str, float]) -> list[dict[str, float]]:
    """`curve` in a worker process, which decodes the object crops itself (cheaper than sending them)."""
    key = (json.dumps(sets, sort_keys=True), preset["pretrain"]["input_size"])
    if key not in _PROBES:
        _PROBES[key] = probe_sets(sets, preset["pretrain"]["input_size"])
    return curve(method, info, _PROBES[key], images_of(*sets["val"]), preset, gflops)
