"""The detector-view probe of the demo's encoders: each converted encoder read the way Mask R-CNN reads it (whole
image through the demo's ViTDet backbone, its last block RoIAligned at every ground-truth box), scored with the
object probe's k-NN and linear probe; beside it the feature health of that block over the val images. Cached in
SEED_DIR/detector_view/<encoder>.json with the settings and weights it was made from; other settings or weights
are evaluated again."""
from __future__ import annotations

import json
from pathlib import Path

from detection.probe import run_detector_probe
from pretrain.evaluation.health import health_line
from pretrain.files import write_json_atomic

from .detectors import det_overrides
from .labels import detector_label, log
from .presets import DEMO_CONFIGS

SOURCE, ROI_SIZE = "block:-1", 4  # the last block, as the pyramid reads it; 4 x 4 RoIs

__all__ = ["SOURCE", "ROI_SIZE", "detector_view"]


def _settings(weights: Path, preset: dict, seed: int) -> dict:
    stat = weights.stat()
    return {"weights": str(weights), "weights_size": stat.st_size, "weights_mtime_ns": stat.st_mtime_ns,
            "config": preset["detection"]["config"], "overrides": det_overrides(preset), "source": SOURCE,
            "roi_size": ROI_SIZE, "probe": dict(preset["probe"]), "seed": seed}


def detector_view(key: str, weights: Path, out_file: Path, sets: dict[str, tuple[str, str]], preset: dict,
                  seed: int) -> dict:
    """The detector-view probe of one converted encoder (`key`: step0, mae, crossmae), cached in `out_file`.

    Returns:
        `detection.probe.run_detector_probe`'s dict (k-NN and linear accuracy, per-block feature health) with the
        settings it was made with.
    """
    settings = _settings(weights, preset, seed)
    if out_file.is_file():
        cached = json.loads(out_file.read_text())
        if cached.get("settings") == settings:
            return cached
    probe = preset["probe"]
    result = run_detector_probe(weights, DEMO_CONFIGS / preset["detection"]["config"], sets["train"], sets["val"],
                                overrides=det_overrides(preset), source=SOURCE, roi_size=ROI_SIZE, seed=seed,
                                k=probe["k"], temperature=probe["temperature"], epochs=probe["epochs"],
                                blr=probe["blr"], batch_size=probe["batch_size"],
                                warmup_epochs=probe["warmup_epochs"])
    result["settings"] = settings
    out_file.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_file, result, indent=1)
    log(f"detector view {detector_label(key)} (seed {seed}): k-NN {result['knn']['accuracy']:.2f} linear "
        f"{result['linear']['accuracy']:.2f}; last block {health_line(result['feature_health'][-1])}")
    return result
