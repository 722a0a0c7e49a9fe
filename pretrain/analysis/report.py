"""The analysis runs behind `tools/visualize.py` and `tools/analyze_attention.py`, for any pretraining checkpoint.

- `reconstruction_grids`: original | masked | reconstruction | reconstruction + visible, one PNG per batch,
  with masks that depend only on (seed, image index).
- `analyze_attention`: MAE's mask-token attention per decoder block (the paper's Table 6 statistic, per key, and
  the per-query mass), or CrossMAE's learned feature-map weights, as .md / .csv / .json tables and a figure.
"""
from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from tqdm import tqdm  # noqa: E402

from ..data.images import image_source, mask_noise  # noqa: E402
from ..distributed import resolve_device  # noqa: E402
from ..errors import ConfigError, DataError  # noqa: E402
from ..models import CrossMAE  # noqa: E402
from ..weights.loading import load_pretrain_model  # noqa: E402
from .attention import AttentionMass, attention_mass_rows, feature_weights, mae_attention_mass  # noqa: E402
from .figures import reconstruction_panels, save_figure, save_reconstruction_grid  # noqa: E402


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"--{name} must be >= 1, got {value}")


def reconstruction_grids(checkpoint: str | Path, images: Sequence[str] = (), builtin: int | None = None,
                         model_name: str | None = None, mask_ratio: float | None = None,
                         prediction_ratio: float | None = None, norm_pix_loss: bool | None = None, seed: int = 0,
                         batch_size: int = 8, output: str | Path = "output/visualize", device: str = "auto",
                         num_workers: int = 0, trust_pickle: bool = False) -> list[Path]:
    """Write reconstruction grids of `checkpoint` on image files/folders (or built-in images) to `output`.

    Also writes `images.tsv` (grid, row, image) and prints one line per unreadable image. See
    `pretrain.weights.loading.load_pretrain_model` for the model arguments.

    Returns:
        The PNG paths, one per batch of `batch_size` readable images.
    """
    _positive("batch_size", batch_size)
    dev = resolve_device(device)
    model, info = load_pretrain_model(checkpoint, model_name, mask_ratio, prediction_ratio, norm_pix_loss,
                                      trust_pickle=trust_pickle)
    print(info["report"])
    model.to(dev)
    source = image_source(images, builtin, model.patch_embed.img_size[0], seed=seed)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    ratios = f"mask {info['mask_ratio']:g}" + (
        f", predict {info['prediction_ratio']:g}" if info["family"] == "crossmae" else "")
    title = f"{Path(checkpoint).name} ({info['name']}), {ratios}, seed {seed}"
    loader = DataLoader(source, batch_size=batch_size, num_workers=num_workers)
    written, skipped, listing = [], [], []
    for imgs, idx, ok in tqdm(loader, desc="reconstructing", unit="batch", disable=None):
        skipped += [source.name(int(i)) for i in idx[~ok]]
        imgs, idx = imgs[ok], idx[ok]
        if len(idx) == 0:
            continue
        noise = mask_noise(idx.tolist(), model.num_patches, seed).to(dev)
        panels = reconstruction_panels(model, imgs.to(dev), noise)
        path = save_reconstruction_grid(panels, out / f"recon_{int(idx[0]):05d}.png", title)
        written.append(path)
        listing += [f"{path.name}\t{row}\t{source.name(int(i))}" for row, i in enumerate(idx)]
    (out / "images.tsv").write_text("grid\trow\timage\n" + "".join(line + "\n" for line in listing))
    for name in skipped:
        print(f"warning: skipped unreadable image {name}")
    print(f"{info['name']} ({info['source']}): wrote {len(written)} grid(s) of {len(listing)} images to {out}")
    return written


def write_table(rows: list[dict[str, Any]], out: Path, stem: str, meta: dict[str, Any]) -> str:
    """Write rows as STEM.csv, STEM.json (with `meta`) and STEM.md; returns the markdown table.

    STEM.md starts with `meta["title"]` and, if `meta` has "columns" ({column(s): meaning}), one line per entry.
    """
    columns = list(rows[0])

    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    with open(out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    (out / f"{stem}.json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in columns) + " |" for r in rows]
    table = "\n".join(lines)
    notes = "".join(f"- `{k}`: {v}\n" for k, v in meta.get("columns", {}).items())
    (out / f"{stem}.md").write_text(f"{meta['title']}\n\n" + (f"{notes}\n" if notes else "") + f"{table}\n")
    return table


def plot_attention_mass(rows: list[dict[str, Any]], title: str, path: Path) -> Path:
    """Bars per decoder block of Table 6's statistic: attention per visible key (cls + visible patches) beside
    attention per mask key, summed over heads; the title gives both statistics' sums over blocks."""
    blocks, total = rows[:-1], rows[-1]
    x = range(len(blocks))
    fig, ax = plt.subplots(figsize=(max(4.5, 1.0 + 0.6 * len(blocks)), 3.6))
    ax.bar([i - 0.2 for i in x], [r["visible"] for r in blocks], 0.4, label="per visible key (cls + patches)")
    ax.bar([i + 0.2 for i in x], [r["mask"] for r in blocks], 0.4, label="per mask key")
    ax.set_xticks(list(x), [r["block"] for r in blocks])
    ax.set_xlabel("decoder block")
    ax.set_ylabel("attention of a mask-token query\nper key, summed over heads")
    ax.set_title(f"{title}\nsum over {len(blocks)} blocks, per key (Table 6): visible {total['visible']:.2f}, "
                 f"mask {total['mask']:.2f}; mass: visible {total['visible_mass']:.2f}, "
                 f"mask {total['mask_mass']:.2f}", fontsize=8)
    ax.legend(fontsize=7)
    return save_figure(fig, path, dpi=120)


def plot_feature_weights(weights: torch.Tensor, rows: list[str], columns: list[str], title: str, path: Path) -> Path:
    """Heatmap of CrossMAE's (decoder block x encoder feature map) weights, on a symmetric colour scale."""
    lim = float(weights.abs().max()) or 1.0
    fig, ax = plt.subplots(figsize=(1.6 + 0.45 * len(columns), 1.2 + 0.35 * len(rows)))
    im = ax.imshow(weights.numpy(), cmap="coolwarm", vmin=-lim, vmax=lim)  # weights are signed: no softmax
    ax.set_xticks(range(len(columns)), columns, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_xlabel("encoder feature map")
    ax.set_ylabel("decoder block")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return save_figure(fig, path, dpi=120)


COLUMN_NOTES = {
    "visible, mask": "Table 6's statistic: attention of a mask-token query per key of the group (visible: cls + "
                     "visible patches; mask: mask tokens), averaged over queries, images and the group's keys, "
                     "summed over heads",
    "*_mass": "softmax mass of a mask-token query on the whole group, averaged over heads, queries and images; "
              "visible_mass + mask_mass = 1 per block",
}


def _mae_report(model, info: dict[str, Any], checkpoint: str | Path, images: Sequence[str], builtin: int | None,
                seed: int, batch_size: int, device: torch.device, num_workers: int, out: Path) -> str:
    source = image_source(images, builtin, model.patch_embed.img_size[0], seed=seed, default_builtin=64)
    loader = DataLoader(source, batch_size=batch_size, num_workers=num_workers)
    totals = AttentionMass(len(model.decoder_blocks))
    skipped = 0
    for imgs, idx, ok in tqdm(loader, desc="attention", unit="batch", disable=None):
        skipped += int((~ok).sum())
        imgs, idx = imgs[ok], idx[ok]
        if len(idx) == 0:
            continue
        noise = mask_noise(idx.tolist(), model.num_patches, seed).to(device)
        # the first batch checks that the recomputed probabilities reproduce each block's output
        sums, count = mae_attention_mass(model, imgs.to(device), noise, verify=totals.count == 0)
        totals.add(sums, count, len(idx))
    if totals.count == 0:
        raise DataError("none of the images could be read; check IMAGES")
    len_keep, num_heads = model.num_visible(), model.decoder_blocks[0].attn.num_heads
    rows = attention_mass_rows(totals.means(), num_heads, len_keep, model.num_patches)
    title = (f"{Path(checkpoint).name} ({info['name']}): attention of mask tokens, {totals.images} images, "
             f"mask ratio {info['mask_ratio']:g}, seed {seed}")
    meta = {"title": title, "checkpoint": str(checkpoint), "model": info["name"], "images": totals.images,
            "skipped_images": skipped, "mask_ratio": info["mask_ratio"], "seed": seed, "cls_counts_as": "visible",
            "num_heads": num_heads, "visible_keys": 1 + len_keep, "mask_keys": model.num_patches - len_keep,
            "columns": COLUMN_NOTES}
    table = write_table(rows, out, "attention", meta)
    plot_attention_mass(rows, info["name"], out / "attention.png")
    notes = "".join(f"{k}: {v}\n" for k, v in COLUMN_NOTES.items())
    return f"{title}\n{notes}{table}"


def _crossmae_report(model: CrossMAE, info: dict[str, Any], checkpoint: str | Path, out: Path) -> str:
    print(f"{info['name']} is a CrossMAE model: its decoder has no self-attention between mask tokens, so there "
          "is no mask-vs-visible attention to measure; reporting its learned feature-map weights instead")
    weights, row_labels, col_labels = feature_weights(model)
    rows = [{"decoder_block": r, **dict(zip(col_labels, w))} for r, w in zip(row_labels, weights.tolist())]
    title = f"{Path(checkpoint).name} ({info['name']}): feature-map weights (wfm.linear.weight)"
    meta = {"title": title, "checkpoint": str(checkpoint), "model": info["name"],
            "use_input": model.use_input, "use_fm": model.use_fm}
    table = write_table(rows, out, "feature_weights", meta)
    plot_feature_weights(weights, row_labels, col_labels, info["name"], out / "feature_weights.png")
    return f"{title}\n{table}"


def analyze_attention(checkpoint: str | Path, images: Sequence[str] = (), builtin: int | None = None,
                      model_name: str | None = None, mask_ratio: float | None = None, seed: int = 0,
                      batch_size: int = 32, output: str | Path = "output/attention", device: str = "auto",
                      num_workers: int = 0, trust_pickle: bool = False) -> str:
    """Write the decoder analysis of `checkpoint` to `output` (attention.* for MAE, feature_weights.* for
    CrossMAE, which needs no images); returns the title and markdown table."""
    _positive("batch_size", batch_size)
    dev = resolve_device(device)
    model, info = load_pretrain_model(checkpoint, model_name, mask_ratio, trust_pickle=trust_pickle)
    print(info["report"])
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(model, CrossMAE):
        if images or builtin:
            print("note: images are not needed for the CrossMAE weights and were not read")
        return _crossmae_report(model, info, checkpoint, out)
    return _mae_report(model.to(dev), info, checkpoint, images, builtin, seed, batch_size, dev, num_workers, out)
