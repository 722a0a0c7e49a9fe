"""Comparing detection runs: the AP table, AP bars, loss curves, predicted masks on val images."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pycocotools.mask as mask_util  # noqa: E402

from pretrain.analysis.figures import save_figure  # noqa: E402
from pretrain.errors import DataError  # noqa: E402

from .mappers import read_image  # noqa: E402


METRICS = ("AP", "AP50", "AP75")
TASKS = ("bbox", "segm")


def load_ap(run_dir: str | Path) -> dict:
    """Read `ap.json` of a train_net output dir: {"bbox": {"AP": ...}, "segm": {...}, ...}."""
    path = Path(run_dir) / "ap.json"
    if not path.is_file():
        raise DataError(f"{path} not found; is {run_dir} a tools/train_net.py output dir with a finished evaluation?")
    return json.loads(path.read_text())


def scored(result: dict) -> dict:
    """A detector's ap.json with AP, AP50 and AP75 of 0 for a task in which it made no detection at all.

    detectron2 reports such a task as NaN (null in ap.json); an empty detection set scores 0 precision at every
    recall, so 0 is its COCO AP, and leaving it out would drop the worst seed from the mean. The size buckets
    (APs / APm / APl) stay null: COCO leaves those undefined also when the val set has no objects of a size.
    """
    out = dict(result)
    for task in TASKS:
        metrics = result.get(task) or {}
        ap = metrics.get("AP")
        if metrics and (ap is None or ap != ap):  # null, or NaN in a file written by another tool
            out[task] = {**metrics, **dict.fromkeys(METRICS, 0.0), "no_detections": True}
    return out


def ap_text(value: float | None) -> str:
    """An AP for the console and the tables; None (detectron2's NaN) means no detection at all, scored 0."""
    return "0 (no detections)" if value is None else f"{value:.1f}"


def ap_cell(result: dict, task: str) -> str:
    """One task's AP of a scored ap.json (`scored`) as table text: '0 (no detections)', 'n/a' or the value."""
    metrics = result.get(task, {})
    if metrics.get("no_detections"):
        return ap_text(None)
    return "n/a" if metrics.get("AP") is None else ap_text(metrics["AP"])


def ap_table(names: list[str], results: list[dict], spread: list[dict] | None = None) -> str:
    """Markdown table: one row per run, bbox/segm AP, AP50, AP75, with deltas to the first run.

    `spread` (one dict per run, same layout) adds "± s" after each value, e.g. a std over seeds.
    """
    cols = [f"{t} {m}" for t in TASKS for m in METRICS]
    lines = ["| backbone | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    base = results[0]
    for i, (name, res) in enumerate(zip(names, results)):
        cells = []
        for t in TASKS:
            for m in METRICS:
                v = res.get(t, {}).get(m)
                if v is None:
                    cells.append("n/a")
                    continue
                s = spread[i].get(t, {}).get(m) if spread else None
                b = base.get(t, {}).get(m)
                delta = f" ({v - b:+.1f})" if i > 0 and b is not None else ""
                cells.append(f"{v:.1f}" + (f" ± {s:.1f}" if s is not None else "") + delta)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mean_std(results: list[dict]) -> tuple[dict, dict]:
    """Mean and sample standard deviation (0 for one run) of AP / AP50 / AP75 over several runs' ap.json.

    A metric missing or NaN in any run (e.g. no detections) is left out of both.
    """
    mean: dict = {}
    std: dict = {}
    for t in TASKS:
        for m in METRICS:
            vals = [r.get(t, {}).get(m) for r in results]
            if not vals or any(v is None or v != v for v in vals):
                continue
            mean.setdefault(t, {})[m] = float(np.mean(vals))
            std.setdefault(t, {})[m] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
    return mean, std


def plot_ap(names: list[str], results: list[dict], path: str | Path, spread: list[dict] | None = None,
            title: str | None = None) -> Path:
    """Grouped bars of bbox and segm AP / AP50 / AP75 per run; optional error bars from `spread`, a `title` over
    both panels."""
    fig, axes = plt.subplots(1, len(TASKS), figsize=(5 * len(TASKS), 3.6), sharey=True)
    width = 0.8 / len(names)
    x = np.arange(len(METRICS))
    for ax, task in zip(axes, TASKS):
        for i, (name, res) in enumerate(zip(names, results)):
            vals = [res.get(task, {}).get(m, 0.0) for m in METRICS]
            err = [spread[i].get(task, {}).get(m, 0.0) for m in METRICS] if spread else None
            bars = ax.bar(x + (i - (len(names) - 1) / 2) * width, vals, width, yerr=err, capsize=3, label=name)
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_xticks(x, METRICS)
        ax.set_title(f"{task} AP")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("AP (%)")
    axes[-1].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path, dpi=110)


def read_metrics(run_dir: str | Path, key: str = "total_loss") -> tuple[list[int], list[float]]:
    """(iterations, values) of `key` from detectron2's `metrics.json` (one JSON object per line)."""
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        raise DataError(f"{path} not found; is {run_dir} a tools/train_net.py output dir?")
    its, vals = [], []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if key in rec:
            its.append(int(rec["iteration"]))
            vals.append(float(rec[key]))
    return its, vals


def plot_curves(curves: dict[str, tuple[list, list]], path: str | Path, title: str, xlabel: str,
                ylabel: str) -> Path:
    """Line plot of several named (x, y) curves."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, (x, y) in curves.items():
        ax.plot(x, y, label=name, linewidth=1.4)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path, dpi=110)


def top_detections(results: list[dict], image_id: int, k: int, min_score: float = 0.05) -> list[dict]:
    """The `k` highest-scoring COCO results of one image with score >= `min_score`, best first."""
    dets = [d for d in results if d["image_id"] == image_id and d["score"] >= min_score]
    return sorted(dets, key=lambda d: -d["score"])[:k]


def plot_predictions(gt_json: str | Path, image_root: str | Path, runs: dict[str, str | Path], path: str | Path,
                     n_images: int = 3, min_score: float = 0.05) -> Path:
    """Val images (rows) with the ground truth and each run's top-scoring masks and boxes (columns).

    Per image and run, the k highest-scoring detections are drawn, k being the image's number of ground-truth
    objects (scores >= `min_score`, labelled on each box): short schedules give low but ranked scores, which a
    fixed threshold would hide. Reads the COCO results each run's COCOEvaluator wrote
    (`inference/coco_instances_results.json`).
    """
    gt = json.loads(Path(gt_json).read_text())
    cats = {c["id"]: c["name"] for c in gt["categories"]}
    images = sorted(gt["images"], key=lambda im: im["id"])[:n_images]
    preds = {}
    for name, run in runs.items():
        res = Path(run) / "inference" / "coco_instances_results.json"
        if not res.is_file():
            raise DataError(f"{res} not found; evaluate {run} first")
        preds[name] = json.loads(res.read_text())
    gt_by_image: dict[int, list] = {}
    for ann in gt["annotations"]:
        gt_by_image.setdefault(ann["image_id"], []).append(ann)
    columns = ["ground truth", *runs]
    fig, axes = plt.subplots(len(images), len(columns), figsize=(2.6 * len(columns), 2.6 * len(images)),
                             squeeze=False)
    colors = plt.get_cmap("tab10")
    for r, im in enumerate(images):
        pixels = read_image(Path(image_root) / im["file_name"], "RGB")
        h, w = pixels.shape[:2]
        for c, col in enumerate(columns):
            if col == "ground truth":
                dets = [{**a, "score": 1.0, "segmentation": mask_util.frPyObjects(a["segmentation"], h, w)}
                        for a in gt_by_image.get(im["id"], [])]
            else:
                dets = top_detections(preds[col], im["id"], len(gt_by_image.get(im["id"], [])), min_score)
            overlay = pixels.astype(np.float32) / 255.0
            ax = axes[r][c]
            for k, det in enumerate(dets):
                seg = det["segmentation"]
                m = mask_util.decode(mask_util.merge(seg) if isinstance(seg, list) else seg).astype(bool)
                color = np.array(colors(det["category_id"] % 10)[:3])
                overlay[m] = 0.5 * overlay[m] + 0.5 * color
                x, y, bw, bh = det["bbox"]
                ax.add_patch(plt.Rectangle((x, y), bw, bh, fill=False, color=color, linewidth=1))
                label = cats.get(det["category_id"], "?") + ("" if col == "ground truth" else f" {det['score']:.2f}")
                ax.text(x, y - 1, label, fontsize=5, color="white", bbox={"facecolor": color, "pad": 0.5, "lw": 0})
            ax.imshow(overlay)
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(col if col == "ground truth" else f"{col}: top k by score (k = objects)", fontsize=7)
    return save_figure(fig, path, dpi=120)
