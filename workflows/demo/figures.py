"""The figures of the demo's report: transfer against compute and time, AP bars, loss curves, reconstructions and
predicted masks."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from detection.report import mean_std, plot_ap, plot_curves, plot_predictions, read_metrics  # noqa: E402
from pretrain.analysis.figures import save_figure  # noqa: E402
from pretrain.training.run_folder import read_log  # noqa: E402

from .labels import DETECTION_EVIDENCE, METHODS, NAMES, detector_label  # noqa: E402
from .stats import PROBES  # noqa: E402

__all__ = ["plot_transfer", "write_figures"]


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
            for m in METHODS:
                x = np.mean([[p[xkey] for p in r["curves"][m]] for r in runs], axis=0)
                y = np.array([[p[key] for p in r["curves"][m]] for r in runs])
                ax.plot(x, y.mean(0), marker="o", color=colors[m], label=NAMES[m])
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


def write_figures(out: Path, cfg: dict, runs: list[dict], ap: dict[str, list[dict]],
                  val_set: tuple[str, str]) -> None:
    """transfer_vs_compute.png, ap_bars.png, det_loss.png, pretrain_loss.png, recon_<method>.png and
    predictions.png into `out`; the loss curves, reconstructions and predictions are the first seed's."""
    first, seeds = runs[0], [r["seed"] for r in runs]
    plot_transfer(runs, out / "transfer_vs_compute.png",
                  f"{cfg['name']} / {cfg['budget']}: frozen features along pretraining, {len(seeds)} seed(s)")
    stats = {k: mean_std(v) for k, v in ap.items()}
    plot_ap([detector_label(k) for k in ap], [stats[k][0] for k in ap], out / "ap_bars.png",
            [stats[k][1] for k in ap] if len(seeds) > 1 else None,
            None if cfg["detection"].get("ranks_backbones") else
            f"a pipeline check, not a ranking of backbones ({DETECTION_EVIDENCE})")
    detection_dir = Path(first["seed_dir"]) / "detection"
    plot_curves({detector_label(k): read_metrics(detection_dir / k) for k in ap}, out / "det_loss.png",
                f"Mask R-CNN training loss (seed {seeds[0]})", "iteration", "total loss")
    pre_curves = {}
    for m in METHODS:
        run_dir = Path(first["pretrain"][m]["run_dir"])
        records = read_log(run_dir)
        pre_curves[NAMES[m]] = ([r["epoch"] for r in records], [r["train_loss"] for r in records])
        recon = sorted((run_dir / "recon").glob("epoch_*.png"))
        if recon:
            (out / f"recon_{m}.png").write_bytes(recon[-1].read_bytes())
    plot_curves(pre_curves, out / "pretrain_loss.png", f"pretraining loss (seed {seeds[0]}; MAE over the masked "
                "patches, CrossMAE over the predicted ones)", "epoch", "loss")
    plot_predictions(val_set[0], val_set[1], {detector_label(k): detection_dir / k for k in ap},
                     out / "predictions.png")
