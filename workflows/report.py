"""The demo's report: `report.md`, `report.json` and the figures, from the runs of `workflows.demo`.

Every number is given per seed in report.json; report.md gives mean ± sample standard deviation over seeds and
differences paired by seed. A difference is called a result only when every seed agrees on its sign and its mean
exceeds the paired standard deviation; otherwise it is reported as inside the spread.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from detection.report import (TASKS, ap_table, mean_std, plot_ap, plot_curves,  # noqa: E402
                              plot_predictions, read_metrics, scored)
from pretrain.visualize import save_figure  # noqa: E402

METHOD_NAMES = {"mae": "MAE", "crossmae": "CrossMAE"}
DETECTORS = {"vitdet_random": "ViTDet random init", "step0": "not pretrained (step 0)", "mae": "MAE",
             "crossmae": "CrossMAE"}
PROBES = {"knn": "object probe k-NN", "linear": "object probe linear", "heldout_loss": "held-out reconstruction loss"}


def detector_name(key: str) -> str:
    frozen = key.endswith("_frozen")
    return DETECTORS[key.removesuffix("_frozen")] + (", frozen" if frozen else "")


def paired(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """a - b paired by seed: mean, sample std (0 for one seed), range, n, and whether it is a result."""
    d = np.asarray(a, float) - np.asarray(b, float)
    std = float(np.std(d, ddof=1)) if len(d) > 1 else 0.0
    result = len(d) > 1 and (bool(np.all(d > 0)) or bool(np.all(d < 0))) and abs(float(d.mean())) > std
    return {"mean": float(d.mean()), "std": std, "min": float(d.min()), "max": float(d.max()), "n": len(d),
            "per_seed": d.tolist(), "result": result}


def describe(diff: dict[str, Any], fmt: str = "+.3f") -> str:
    """'+0.120 (3 seeds: std 0.030, range +0.080 to +0.150; a result)'."""
    if diff["n"] == 1:
        return f"{format(diff['mean'], fmt)} (one seed: no spread; `--seeds 0 1 2` measures it)"
    verdict = "a result" if diff["result"] else "inside the spread"
    return (f"{format(diff['mean'], fmt)} ({diff['n']} seeds: std {diff['std']:.3f}, range {format(diff['min'], fmt)} "
            f"to {format(diff['max'], fmt)}; {verdict})")


def _ms(values: Sequence[float], fmt: str = ".3f") -> str:
    v = np.asarray(values, float)
    return format(v.mean(), fmt) + (f" ± {v.std(ddof=1):{fmt}}" if len(v) > 1 else "")


def _final(points: list[dict]) -> dict:
    return points[-1]


def at_compute(points: list[dict], tflops: float, key: str) -> float:
    """A curve's metric at `tflops` of pretraining compute, linearly interpolated between snapshots."""
    return float(np.interp(tflops, [p["pretrain_tflops"] for p in points], [p[key] for p in points]))


def plot_transfer(runs: list[dict], path: Path, title: str) -> Path:
    """Probe accuracy and held-out loss against pretraining compute (top) and wall time (bottom), both methods,
    mean over seeds with the min-max band; the dashed line is the step-0 encoder both started from."""
    keys = list(PROBES)
    fig, axes = plt.subplots(2, len(keys), figsize=(4.2 * len(keys), 6.6), squeeze=False)
    colors = {"mae": "tab:blue", "crossmae": "tab:orange"}
    for row, xkey, xlabel in ((0, "pretrain_tflops", "pretraining compute (TFLOPs, 3 x forward)"),
                              (1, "pretrain_s", "pretraining time (s)")):
        for col, key in enumerate(keys):
            ax = axes[row][col]
            for m in METHOD_NAMES:
                x = np.mean([[p[xkey] for p in r["curves"][m]] for r in runs], axis=0)
                y = np.array([[p[key] for p in r["curves"][m]] for r in runs])
                ax.plot(x, y.mean(0), marker="o", color=colors[m], label=METHOD_NAMES[m])
                if len(runs) > 1:
                    ax.fill_between(x, y.min(0), y.max(0), color=colors[m], alpha=0.2)
            control = np.mean([r["curves"]["mae"][0][key] for r in runs])
            ax.axhline(control, color="grey", linestyle="--", linewidth=1, label="step 0 (control)")
            ax.set_xlabel(xlabel, fontsize=8)
            ax.set_title(PROBES[key], fontsize=9)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path, dpi=110)


def _side_by_side(cfg: dict) -> str:
    jobs, threads = (cfg.get("parallel") or {}).get("jobs", 1), (cfg.get("parallel") or {}).get("threads")
    if jobs == 1:
        return ", one run at a time"
    return (f", {jobs} runs side by side at {threads} thread(s) each (each pretraining beside another run: a "
            "detector or the other pretraining; the step times below are of that load, indicative rather than exact)")


def write_report(out: Path, cfg: dict, runs: list[dict], gflops: dict[str, dict[str, float]],
                 sets: dict[str, tuple[str, str]], total_s: float) -> str:
    """Write OUT/report.md, OUT/report.json and the figures; returns the markdown.

    Args:
        out: the demo's output folder.
        cfg: the preset it ran.
        runs: per seed {"seed", "pretrain", "curves", "detection", "seed_dir"} (see `workflows.demo.run`).
        gflops: per method, forward GFLOPs per image ("encoder", "decoder", "total").
        sets: (json, image folder) of the detection set's "train" and "val" splits.
        total_s: this invocation's wall time.
    """
    out = Path(out)
    val_set = sets["val"]
    n_train = len(json.loads(Path(sets["train"][0]).read_text())["images"])
    seeds = [r["seed"] for r in runs]
    several = len(seeds) > 1
    first = runs[0]
    det_keys = list(first["detection"])
    detections = [{k: scored(v) for k, v in r["detection"].items()} for r in runs]  # per seed
    ap = {k: [d[k] for d in detections] for k in det_keys}
    final = {m: [_final(r["curves"][m]) for r in runs] for m in METHOD_NAMES}
    step0 = [r["curves"]["mae"][0] for r in runs]

    # ---- figures
    plot_transfer(runs, out / "transfer_vs_compute.png",
                  f"{cfg['name']} / {cfg['budget']}: frozen features along pretraining, {len(seeds)} seed(s)")
    stats = {k: mean_std(v) for k, v in ap.items()}
    names = [detector_name(k) for k in det_keys]
    plot_ap(names, [stats[k][0] for k in det_keys], out / "ap_bars.png",
            [stats[k][1] for k in det_keys] if several else None)
    plot_curves({detector_name(k): read_metrics(Path(first["seed_dir"]) / "detection" / k) for k in det_keys},
                out / "det_loss.png", f"Mask R-CNN training loss (seed {seeds[0]})", "iteration", "total loss")
    pre_curves = {}
    for m in METHOD_NAMES:
        run_dir = Path(first["pretrain"][m]["run_dir"])
        recs = [json.loads(line) for line in (run_dir / "log.txt").read_text().splitlines()]
        pre_curves[METHOD_NAMES[m]] = ([r["epoch"] for r in recs], [r["train_loss"] for r in recs])
        recon = sorted((run_dir / "recon").glob("epoch_*.png"))
        if recon:
            (out / f"recon_{m}.png").write_bytes(recon[-1].read_bytes())
    plot_curves(pre_curves, out / "pretrain_loss.png", f"pretraining loss (seed {seeds[0]}; MAE over the masked "
                "patches, CrossMAE over the predicted ones)", "epoch", "loss")
    plot_predictions(val_set[0], val_set[1], {detector_name(k): Path(first["seed_dir"]) / "detection" / k
                                              for k in det_keys}, out / "predictions.png")

    # ---- numbers
    pc = first["pretrain"]["mae"]["config"]
    lr = pc["lr"] if pc["lr"] is not None else pc["blr"] * pc["batch_size"] / 256
    cost = {m: {"decoder_gflops": gflops[m]["decoder"], "forward_gflops": gflops[m]["total"],
                "pretrain_tflops": final[m][0]["pretrain_tflops"],
                "pretrain_s": [r["pretrain"][m]["time_s"] for r in runs],
                "step_s": [r["pretrain"][m]["time_s"] / r["pretrain"][m]["steps"] for r in runs],
                "final_loss": [r["pretrain"][m]["final_loss"] for r in runs]} for m in METHOD_NAMES}
    diffs = {}
    for key in PROBES:
        for m in METHOD_NAMES:
            diffs[f"{key}: {METHOD_NAMES[m]} - step 0"] = paired([p[key] for p in final[m]], [p[key] for p in step0])
        diffs[f"{key}: CrossMAE - MAE, equal steps"] = paired([p[key] for p in final["crossmae"]],
                                                              [p[key] for p in final["mae"]])
        diffs[f"{key}: CrossMAE - MAE, equal compute"] = paired(
            [p[key] for p in final["crossmae"]],
            [at_compute(r["curves"]["mae"], _final(r["curves"]["crossmae"])["pretrain_tflops"], key) for r in runs])
    ap_diffs = {}
    for task in TASKS:
        for a, b in (("mae", "step0"), ("crossmae", "step0"), ("crossmae", "mae"), ("step0", "vitdet_random")):
            for suffix in ("", "_frozen"):
                if a + suffix in ap and b + suffix in ap:
                    ap_diffs[f"{task} AP: {detector_name(a + suffix)} - {detector_name(b + suffix)}"] = paired(
                        [r[task]["AP"] for r in ap[a + suffix]], [r[task]["AP"] for r in ap[b + suffix]])
    beats = {m: {key: all(f[key] > s[key] for f, s in zip(final[m], step0)) for key in ("knn", "linear")}
             for m in METHOD_NAMES}

    report = {"preset": cfg["name"], "budget": cfg["budget"], "seeds": seeds, "config": cfg, "lr": lr,
              "gflops": gflops, "cost": cost, "probe_differences": diffs, "ap_differences": ap_diffs,
              "beats_control_every_seed": beats, "total_s": total_s,
              "runs": [{"seed": r["seed"], "curves": r["curves"],
                        "pretrain": {m: {k: v for k, v in r["pretrain"][m].items() if k != "config"}
                                     for m in METHOD_NAMES},
                        "detection": d} for r, d in zip(runs, detections)]}
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))

    steps = final["mae"][0]["step"]
    seed_text = (f"{len(seeds)} seeds ({', '.join(map(str, seeds))}): mean ± standard deviation, differences "
                 "paired by seed" if several else f"one seed ({seeds[0]}); `--seeds 0 1 2` measures the spread")
    lines = [f"# Demo: MAE vs CrossMAE backbones ({cfg['name']}, budget {cfg['budget']})", "",
             f"Self-pretraining on the detection set's {n_train} train images "
             f"(labels unused), ViT `{cfg['model']}`, {steps} steps of {pc['batch_size']} crops at {pc['input_size']} "
             f"px for both methods, from the same step-0 encoder, at the same absolute lr {lr:.2e} (the demo's rule; "
             f"the full-scale recipes keep CrossMAE's released rule, lr x prediction / mask ratio); CrossMAE at "
             f"prediction ratio {cfg['crossmae_prediction_ratio']}. Mask R-CNN {cfg['detection']['iters']} iterations. "
             f"{seed_text}. This invocation took {total_s / 60:.1f} min{_side_by_side(cfg)}."
             + (f" Preset settings changed with --set: {', '.join(f'`{x}`' for x in cfg['set'])}." if cfg.get("set")
                else ""), "",
             "## Frozen encoder at the end of pretraining", "",
             "Object probe: every ground-truth box of the detection set cropped to the encoder's input, the spatial "
             f"grid of {'the last block' if cfg['probe']['block'] == -1 else 'block ' + str(cfg['probe']['block'])}'s "
             f"tokens; k-NN (k {cfg['probe']['k']}, T "
             f"{cfg['probe']['temperature']}) and a linear probe (BatchNorm + linear, {cfg['probe']['epochs']} epochs) "
             "trained on the train split's objects, scored on the val split's. Held-out loss: normalised-pixel MSE "
             "over every masked patch of the val images, fixed masks, both methods.", "",
             "| encoder | k-NN | linear | held-out loss |", "|---|---|---|---|",
             f"| not pretrained (step 0) | {_ms([p['knn'] for p in step0])} | {_ms([p['linear'] for p in step0])} | "
             f"{_ms([p['heldout_loss'] for p in step0])} |"]
    for m in METHOD_NAMES:
        lines.append(f"| {METHOD_NAMES[m]} | {_ms([p['knn'] for p in final[m]])} | "
                     f"{_ms([p['linear'] for p in final[m]])} | {_ms([p['heldout_loss'] for p in final[m]])} |")
    lines += ["", "Differences (equal compute: CrossMAE's final snapshot against MAE's curve interpolated at the "
              "same pretraining FLOPs):", ""]
    lines += [f"- {k}: {describe(v)}" for k, v in diffs.items()]
    lines += ["", "Does each pretrained encoder beat the step-0 control on the object probe in every seed? "
              + "; ".join(f"{METHOD_NAMES[m]}: k-NN {'yes' if b['knn'] else 'no'}, linear {'yes' if b['linear'] else 'no'}"
                          for m, b in beats.items()) + ".", "",
              "Curves against compute and time: `transfer_vs_compute.png`.", "",
              "## Mask R-CNN on the val split", "",
              ap_table(names, [stats[k][0] for k in det_keys], [stats[k][1] for k in det_keys] if several else None),
              "", "Deltas in brackets are against the first row. Paired differences of AP:", ""]
    lines += [f"- {k}: {describe(v, '+.1f')}" for k, v in ap_diffs.items()]
    if several:
        lines += ["", "Per seed, bbox AP / segm AP:", "", "| backbone | " + " | ".join(f"seed {s}" for s in seeds) + " |",
                  "|---" * (len(seeds) + 1) + "|"]
        for k in det_keys:
            lines.append(f"| {detector_name(k)} | " + " | ".join(f"{_ap(r, 'bbox')} / {_ap(r, 'segm')}" for r in ap[k])
                         + " |")
    lines += ["", "## Pretraining cost", "",
              "| method | decoder GFLOPs / image | forward GFLOPs / image | pretraining TFLOPs | pretraining time (s) "
              "| step time (s) | final training loss |", "|---|---|---|---|---|---|---|"]
    for m, c in cost.items():
        lines.append(f"| {METHOD_NAMES[m]} | {c['decoder_gflops']:.4f} | {c['forward_gflops']:.4f} | "
                     f"{c['pretrain_tflops']:.1f} | {_ms(c['pretrain_s'], '.0f')} | {_ms(c['step_s'], '.3f')} | "
                     f"{_ms(c['final_loss'], '.4f')} |")
    lines += ["", "The training losses are not comparable between methods: MAE's covers every masked patch, "
              "CrossMAE's only the predicted ones; the held-out loss above scores both on the same patches.", "",
              "Figures: `transfer_vs_compute.png`, `ap_bars.png`, `det_loss.png`, `pretrain_loss.png`, "
              "`recon_mae.png`, `recon_crossmae.png`, `predictions.png`; every number per seed: `report.json`.", ""]
    text = "\n".join(lines)
    (out / "report.md").write_text(text)
    return text


def ap_text(value: float | None) -> str:
    """An AP for the console and the tables; None (detectron2's NaN) means no detection at all, scored 0."""
    return "0 (no detections)" if value is None else f"{value:.1f}"


def _ap(result: dict, task: str) -> str:
    metrics = result.get(task, {})
    if metrics.get("no_detections"):
        return ap_text(None)
    return "n/a" if metrics.get("AP") is None else ap_text(metrics["AP"])
