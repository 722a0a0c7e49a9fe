"""The demo's report: `report.json` (every number per seed) and `report.md` (mean ± standard deviation over seeds,
differences paired by seed), with the figures of `figures`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from detection.report import ap_cell, ap_table, mean_std
from pretrain.evaluation.probe import chance_text
from pretrain.files import write_text_atomic

from .data import object_chance
from .figures import write_figures
from .labels import METHODS, NAMES, PIPELINE_CHECK, detector_label
from .stats import describe, mean_std_text, report_numbers

__all__ = ["write_report", "probe_section", "detector_view_section", "detection_section"]


def write_report(out: Path, cfg: dict, runs: list[dict], gflops: dict[str, dict[str, float]],
                 sets: dict[str, tuple[str, str]], total_s: float) -> str:
    """Write OUT/report.md, OUT/report.json and the figures; returns the markdown.

    Args:
        out: the demo's output folder.
        cfg: the preset it ran.
        runs: per seed {"seed", "pretrain", "curves", "detection", "seed_dir"} (see `pipeline.run_seed`).
        gflops: per method, forward GFLOPs per image ("encoder", "decoder", "total").
        sets: (json, image folder) of the detection set's "train" and "val" splits.
        total_s: this invocation's wall time.
    """
    out = Path(out)
    numbers = report_numbers(runs, gflops)
    chance, classes = object_chance(sets)
    write_figures(out, cfg, runs, numbers["ap"], sets["val"])
    pc = runs[0]["pretrain"]["mae"]["config"]
    lr = pc["lr"] if pc["lr"] is not None else pc["blr"] * pc["batch_size"] / 256
    report = {"preset": cfg["name"], "budget": cfg["budget"], "seeds": [r["seed"] for r in runs], "config": cfg,
              "lr": lr, "gflops": gflops, "cost": numbers["cost"], "probe_differences": numbers["probe_differences"],
              "probe_chance": chance, "ap_differences": numbers["ap_differences"],
              "beats_control_every_seed": numbers["beats"],
              "detection_ranks_backbones": bool(cfg["detection"].get("ranks_backbones")),
              "total_s": total_s,
              "runs": [{"seed": r["seed"], "curves": r["curves"],
                        "pretrain": {m: {k: v for k, v in r["pretrain"][m].items() if k != "config"} for m in METHODS},
                        "detector_view": r.get("detector_view", {}),
                        "detection": {k: v[i] for k, v in numbers["ap"].items()}} for i, r in enumerate(runs)]}
    write_text_atomic(out / "report.json", json.dumps(report, indent=1, default=str))
    n_train = len(json.loads(Path(sets["train"][0]).read_text())["images"])
    lines = (_intro(cfg, runs, numbers, lr, n_train, total_s) + probe_section(cfg, numbers, chance, classes)
             + detector_view_section(runs) + detection_section(cfg, runs, numbers) + _cost_section(numbers))
    text = "\n".join(lines)
    write_text_atomic(out / "report.md", text)
    return text


def _side_by_side(cfg: dict) -> str:
    jobs, threads = (cfg.get("parallel") or {}).get("jobs", 1), (cfg.get("parallel") or {}).get("threads")
    if jobs == 1:
        return ", one run at a time"
    return (f", {jobs} runs side by side at {threads} thread(s) each (each pretraining beside another run: a "
            "detector or the other pretraining; the step times below are of that load, indicative rather than exact)")


def _intro(cfg: dict, runs: list[dict], numbers: dict[str, Any], lr: float, n_train: int, total_s: float) -> list[str]:
    seeds = [r["seed"] for r in runs]
    pc = runs[0]["pretrain"]["mae"]["config"]
    steps = numbers["final"]["mae"][0]["step"]
    seed_text = (f"{len(seeds)} seeds ({', '.join(map(str, seeds))}): mean ± standard deviation, differences "
                 "paired by seed" if len(seeds) > 1 else f"one seed ({seeds[0]}); `--seeds 0 1 2` measures the spread")
    changed = (f" Preset settings changed with --set: {', '.join(f'`{x}`' for x in cfg['set'])}." if cfg.get("set")
               else "")
    return [f"# Demo: MAE vs CrossMAE backbones ({cfg['name']}, budget {cfg['budget']})", "",
            f"Self-pretraining on the detection set's {n_train} train images "
            f"(labels unused), ViT `{cfg['model']}`, {steps} steps of {pc['batch_size']} crops at {pc['input_size']} "
            f"px for both methods, from the same step-0 encoder, at the same absolute lr {lr:.2e} (the demo's rule; "
            f"the full-scale recipes keep CrossMAE's released rule, lr x prediction / mask ratio); CrossMAE at "
            f"prediction ratio {cfg['crossmae_prediction_ratio']}. Mask R-CNN {cfg['detection']['iters']} iterations. "
            f"{seed_text}. This invocation took {total_s / 60:.1f} min{_side_by_side(cfg)}.{changed}", ""]


def probe_section(cfg: dict, numbers: dict[str, Any], chance: dict[str, float | int], classes: list[str]) -> list[str]:
    """The object probe and feature health of each final encoder and the step-0 one, with the chance levels
    (`pretrain.evaluation.probe.chance_levels`) of the objects."""
    probe, final, step0 = cfg["probe"], numbers["final"], numbers["step0"]
    block = "the last block" if probe["block"] == -1 else f"block {probe['block']}"
    lines = ["## Frozen encoder at the end of pretraining", "",
             "Object probe: every ground-truth box of the detection set cropped to the encoder's input, the spatial "
             f"grid of {block}'s tokens; k-NN (k {probe['k']}, T {probe['temperature']}) and a linear probe "
             f"(BatchNorm + linear, {probe['epochs']} epochs) trained on the train split's objects, scored on the val "
             "split's. Held-out loss: normalised-pixel MSE over every masked patch of the val images, fixed masks, "
             "both methods. Chance on the val objects, for both probes and both views: "
             f"{chance_text(chance, classes)} (always answering the train split's most frequent class).", "",
             "| encoder | k-NN | linear | held-out loss |", "|---|---|---|---|"]
    for name, points in [("not pretrained (step 0)", step0)] + [(NAMES[m], final[m]) for m in METHODS]:
        lines.append(f"| {name} | {mean_std_text([p['knn'] for p in points])} | "
                     f"{mean_std_text([p['linear'] for p in points])} | "
                     f"{mean_std_text([p['heldout_loss'] for p in points])} |")
    lines += ["", f"Feature health of {block} over the val objects (pretraining can grow near-constant channels that "
              "dominate every token): overall std, the largest channel mean in units of the median channel std, mean "
              "token norm.", "", "| encoder | std | largest channel mean / median channel std | token norm |",
              "|---|---|---|---|"]
    for name, points in [("not pretrained (step 0)", step0)] + [(NAMES[m], final[m]) for m in METHODS]:
        health = [p["health"] for p in points]
        lines.append(f"| {name} | {mean_std_text([h['std'] for h in health], '.1f')} | "
                     f"{mean_std_text([h['dominance'] for h in health], '.1f')} | "
                     f"{mean_std_text([h['token_norm'] for h in health], '.0f')} |")
    lines += ["", "Differences (equal compute: CrossMAE's final snapshot against MAE's curve interpolated at the "
              "same pretraining FLOPs):", ""]
    lines += [f"- {k}: {describe(v)}" for k, v in numbers["probe_differences"].items()]
    verdicts = "; ".join(f"{NAMES[m]}: k-NN {'yes' if b['knn'] else 'no'}, linear {'yes' if b['linear'] else 'no'}"
                         for m, b in numbers["beats"].items())
    return lines + ["", f"Does each pretrained encoder beat the step-0 control on the object probe in every seed? "
                    f"{verdicts}.", "", "Curves against compute and time: `transfer_vs_compute.png`.", ""]


def detector_view_section(runs: list[dict]) -> list[str]:
    """The detector-view probe of each final encoder (`detector_view`): accuracies and the last block's health."""
    views = [r["detector_view"] for r in runs]
    first = next(iter(views[0].values()))
    lines = ["## Frozen encoder as the detector reads it", "",
             f"Detector-view probe: each encoder converted for the demo's ViTDet (`{first['settings']['config']}`), "
             f"whole test images through it (windows as configured, no cls token), the last block RoIAligned "
             f"{first['roi_size']} x {first['roi_size']} at every ground-truth box; the same k-NN and linear probe. "
             "Health: the last block over the val images.", "",
             "| encoder | k-NN | linear | std | largest channel mean / median channel std | token norm |",
             "|---|---|---|---|---|---|"]
    for key in views[0]:
        got = [v[key] for v in views]
        health = [g["feature_health"][-1] for g in got]
        lines.append(f"| {detector_label(key)} | {mean_std_text([g['knn']['accuracy'] for g in got])} | "
                     f"{mean_std_text([g['linear']['accuracy'] for g in got])} | "
                     f"{mean_std_text([h['std'] for h in health], '.1f')} | "
                     f"{mean_std_text([h['dominance'] for h in health], '.1f')} | "
                     f"{mean_std_text([h['token_norm'] for h in health], '.0f')} |")
    return lines + [""]


def detection_section(cfg: dict, runs: list[dict], numbers: dict[str, Any]) -> list[str]:
    """The report's Mask R-CNN section: AP mean (± std over seeds), paired differences, per-seed AP; labelled a
    pipeline check, with the evidence, unless the preset's detection stage `ranks_backbones`."""
    ap, several = numbers["ap"], len(runs) > 1
    stats = {k: mean_std(v) for k, v in ap.items()}
    ranks = cfg["detection"].get("ranks_backbones")
    lines = ["## Mask R-CNN on the val split" + ("" if ranks else ": a pipeline check, not a ranking"), ""]
    lines += [] if ranks else [PIPELINE_CHECK, ""]
    lines += [ap_table([detector_label(k) for k in ap], [stats[k][0] for k in ap],
                      [stats[k][1] for k in ap] if several else None),
             "", "Deltas in brackets are against the first row. Paired differences of AP:", ""]
    lines += [f"- {k}: {describe(v, '+.1f')}" for k, v in numbers["ap_differences"].items()]
    if several:
        seeds = [r["seed"] for r in runs]
        lines += ["", "Per seed, bbox AP / segm AP:", "", "| backbone | " + " | ".join(f"seed {s}" for s in seeds)
                  + " |", "|---" * (len(seeds) + 1) + "|"]
        lines += [f"| {detector_label(k)} | " + " | ".join(f"{ap_cell(r, 'bbox')} / {ap_cell(r, 'segm')}" for r in v)
                  + " |" for k, v in ap.items()]
    return lines


def _cost_section(numbers: dict[str, Any]) -> list[str]:
    lines = ["", "## Pretraining cost", "",
             "| method | decoder GFLOPs / image | forward GFLOPs / image | pretraining TFLOPs | pretraining time (s) "
             "| step time (s) | final training loss |", "|---|---|---|---|---|---|---|"]
    for m, c in numbers["cost"].items():
        lines.append(f"| {NAMES[m]} | {c['decoder_gflops']:.4f} | {c['forward_gflops']:.4f} | "
                     f"{c['pretrain_tflops']:.1f} | {mean_std_text(c['pretrain_s'], '.0f')} | "
                     f"{mean_std_text(c['step_s'], '.3f')} | {mean_std_text(c['final_loss'], '.4f')} |")
    return lines + ["", "The training losses are not comparable between methods: MAE's covers every masked patch, "
                    "CrossMAE's only the predicted ones; the held-out loss above scores both on the same patches.", "",
                    "Figures: `transfer_vs_compute.png`, `ap_bars.png`, `det_loss.png`, `pretrain_loss.png`, "
                    "`recon_mae.png`, `recon_crossmae.png`, `predictions.png`; every number per seed: `report.json`.",
                    ""]
