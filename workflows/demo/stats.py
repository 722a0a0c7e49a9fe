"""The numbers of the demo's report: per-seed values, mean ± sample standard deviation, and differences paired by
seed. A difference is called a result only when every seed agrees on its sign and its mean exceeds the paired
standard deviation; otherwise it is reported as inside the spread."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from detection.report import TASKS, scored

from .labels import METHODS, NAMES, detector_label

PROBES = {"knn": "object probe k-NN", "linear": "object probe linear", "heldout_loss": "held-out reconstruction loss"}

__all__ = ["PROBES", "paired", "describe", "mean_std_text", "at_compute", "report_numbers"]


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


def mean_std_text(values: Sequence[float], fmt: str = ".3f") -> str:
    """'0.512 ± 0.010' over seeds ('0.512' for one)."""
    v = np.asarray(values, float)
    return format(v.mean(), fmt) + (f" ± {v.std(ddof=1):{fmt}}" if len(v) > 1 else "")


def at_compute(points: list[dict], tflops: float, key: str) -> float:
    """A curve's metric at `tflops` of pretraining compute, linearly interpolated between snapshots."""
    return float(np.interp(tflops, [p["pretrain_tflops"] for p in points], [p[key] for p in points]))


def _probe_differences(final: dict[str, list[dict]], step0: list[dict], runs: list[dict]) -> dict[str, dict]:
    diffs = {}
    for key in PROBES:
        for m in METHODS:
            diffs[f"{key}: {NAMES[m]} - step 0"] = paired([p[key] for p in final[m]], [p[key] for p in step0])
        diffs[f"{key}: CrossMAE - MAE, equal steps"] = paired([p[key] for p in final["crossmae"]],
                                                              [p[key] for p in final["mae"]])
        diffs[f"{key}: CrossMAE - MAE, equal compute"] = paired(
            [p[key] for p in final["crossmae"]],
            [at_compute(r["curves"]["mae"], r["curves"]["crossmae"][-1]["pretrain_tflops"], key) for r in runs])
    return diffs


def _ap_differences(ap: dict[str, list[dict]]) -> dict[str, dict]:
    diffs = {}
    for task in TASKS:
        for a, b in (("mae", "step0"), ("crossmae", "step0"), ("crossmae", "mae"), ("step0", "vitdet_random")):
            for suffix in ("", "_frozen"):
                if a + suffix in ap and b + suffix in ap:
                    diffs[f"{task} AP: {detector_label(a + suffix)} - {detector_label(b + suffix)}"] = paired(
                        [r[task]["AP"] for r in ap[a + suffix]], [r[task]["AP"] for r in ap[b + suffix]])
    return diffs


def report_numbers(runs: list[dict], gflops: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Everything the report states, from the runs of every seed.

    Returns:
        {"final": per method the last curve point of each seed, "step0": the step-0 point of each seed,
         "ap": per detector run its scored ap.json of each seed, "cost": per method FLOPs, times and losses,
         "probe_differences", "ap_differences": paired differences, "beats": per method and probe whether it
         beats the step-0 control in every seed}
    """
    final = {m: [r["curves"][m][-1] for r in runs] for m in METHODS}
    step0 = [r["curves"]["mae"][0] for r in runs]
    ap = {k: [scored(r["detection"][k]) for r in runs] for k in runs[0]["detection"]}
    cost = {m: {"decoder_gflops": gflops[m]["decoder"], "forward_gflops": gflops[m]["total"],
                "pretrain_tflops": final[m][0]["pretrain_tflops"],
                "pretrain_s": [r["pretrain"][m]["time_s"] for r in runs],
                "step_s": [r["pretrain"][m]["time_s"] / r["pretrain"][m]["steps"] for r in runs],
                "final_loss": [r["pretrain"][m]["final_loss"] for r in runs]} for m in METHODS}
    beats = {m: {key: all(f[key] > s[key] for f, s in zip(final[m], step0)) for key in ("knn", "linear")}
             for m in METHODS}
    return {"final": final, "step0": step0, "ap": ap, "cost": cost,
            "probe_differences": _probe_differences(final, step0, runs), "ap_differences": _ap_differences(ap),
            "beats": beats}
