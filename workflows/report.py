"""The demo's report: `report.md` with its tables and the figures, from the runs of `workflows.demo`."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from detection.report import TASKS, ap_table, mean_std, plot_ap, plot_curves, plot_predictions, read_metrics


def write_report(out: Path, results: dict[str, list[dict]], run_dirs: dict[str, list[Path]],
                 pretrain: dict[str, list[dict]], gflops: dict[str, float], size: dict, seeds: list[int],
                 total_s: float, gt_json: str | Path, image_root: str | Path) -> str:
    """The demo's report: `report.md` plus `ap_bars.png`, `det_loss.png`, `pretrain_loss.png`,
    `recon_<method>.png` and `predictions.png` in `out`. Returns the markdown.

    `results[name]` and `run_dirs[name]` hold one entry per seed (in `seeds` order), `pretrain[method]` one
    summary per seed. Tables give the mean over seeds (± the standard deviation with several seeds); curves,
    reconstructions and predictions are the first seed's.
    """
    out = Path(out)
    names = list(results)
    stats = {n: mean_std(results[n]) for n in names}
    means, spreads = [stats[n][0] for n in names], [stats[n][1] for n in names]
    several = len(seeds) > 1
    plot_ap(names, means, out / "ap_bars.png", spreads if several else None)
    plot_curves({n: read_metrics(run_dirs[n][0]) for n in names}, out / "det_loss.png",
                f"Mask R-CNN training loss (built-in shapes, seed {seeds[0]})", "iteration", "total loss")
    pre_curves = {}
    for method, infos in pretrain.items():
        run = Path(infos[0]["checkpoint"]).parent
        recs = [json.loads(line) for line in (run / "log.txt").read_text().splitlines()]
        pre_curves[method] = ([r["epoch"] for r in recs], [r["train_loss"] for r in recs])
        recon = sorted((run / "recon").glob("epoch_*.png"))
        if recon:
            (out / f"recon_{method}.png").write_bytes(recon[-1].read_bytes())
    plot_curves(pre_curves, out / "pretrain_loss.png", f"pretraining loss (normalised-pixel MSE, seed {seeds[0]})",
                "epoch", "loss")
    plot_predictions(gt_json, image_root, {n: d[0] for n, d in run_dirs.items()}, out / "predictions.png")

    steps_s = sum(i["time_s"] for infos in pretrain.values() for i in infos) + sum(
        r.get("time_s", 0.0) for runs in results.values() for r in runs)
    seed_text = (f"{len(seeds)} seeds ({', '.join(map(str, seeds))}): mean ± standard deviation" if several
                 else f"one seed ({seeds[0]}); `--seeds 0 1 2` shows the run-to-run spread")
    method_of = {"MAE": "mae", "CrossMAE": "crossmae"}
    lines = ["# Demo: MAE vs CrossMAE backbones for Mask R-CNN", "",
             f"Built-in data, ViT `{size['model']}`; pretraining {size['pretrain']['epochs']} epochs at "
             f"{size['pretrain']['input_size']} px on {size['pretrain']['builtin_size']} images; Mask R-CNN "
             f"{size['det_iters']} iterations; {seed_text}. Steps took {steps_s / 60:.1f} min in all "
             f"(this invocation {total_s / 60:.1f} min; finished steps are reused).", "",
             "## Detection AP on the val split (delta against random initialisation)", "",
             ap_table(names, means, spreads if several else None), ""]
    if "MAE" in stats and "CrossMAE" in stats:
        lines += [_crossmae_vs_mae(results["MAE"], results["CrossMAE"]), ""]
    if several:
        lines += ["## Per seed (bbox AP / segm AP)", "",
                  "| backbone | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---" * (len(seeds) + 1) + "|"]
        for n in names:
            cells = [f"{_get(r, 'bbox')} / {_get(r, 'segm')}" for r in results[n]]
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Pretraining cost", "",
              "| backbone | pretraining time (s) | final loss | decoder GFLOPs / image |", "|---|---|---|---|"]
    for name in names:
        m = method_of.get(name)
        if m is None:
            lines.append(f"| {name} | - | - | - |")
        else:
            t = np.mean([i["time_s"] for i in pretrain[m]])
            loss = np.mean([i["final_loss"] for i in pretrain[m]])
            lines.append(f"| {name} | {t:.0f} | {loss:.4f} | {gflops[m]:.3f} |")
    lines += ["", "Figures: `ap_bars.png`, `det_loss.png`, `pretrain_loss.png`, `recon_mae.png`, `recon_crossmae.png`, "
              "`predictions.png`.", ""]
    text = "\n".join(lines)
    (out / "report.md").write_text(text)
    return text


def _get(result: dict, task: str) -> str:
    v = result.get(task, {}).get("AP")
    return "n/a" if v is None else f"{v:.1f}"


def _crossmae_vs_mae(mae: list[dict], cross: list[dict]) -> str:
    """One sentence: CrossMAE minus MAE bbox / segm AP, paired by seed, against the seed-to-seed spread."""
    parts = []
    for task in TASKS:
        diffs = [c[task]["AP"] - m[task]["AP"] for m, c in zip(mae, cross)
                 if c.get(task, {}).get("AP") is not None and m.get(task, {}).get("AP") is not None]
        if not diffs:
            parts.append(f"{task} AP n/a")
            continue
        text = f"{task} AP {np.mean(diffs):+.1f}"
        if len(diffs) > 1:
            text += f" (paired over {len(diffs)} seeds: std {np.std(diffs, ddof=1):.1f}, range {min(diffs):+.1f} to {max(diffs):+.1f})"
        parts.append(text)
    return "CrossMAE minus MAE: " + "; ".join(parts) + "."
