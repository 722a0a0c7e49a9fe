"""Reconstruction figures: original | masked input | reconstruction | reconstruction + visible."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ..data.images import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from ..files import write_atomic  # noqa: E402

_GREY = 0.5  # fill for patches that are neither visible nor predicted
COLUMNS = ("original", "masked input", "reconstruction", "reconstruction + visible")


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Lay out, write atomically (creating the folder) and close a matplotlib figure, in the format its suffix
    names (PNG without one); returns the path."""
    fig.tight_layout()
    path = Path(path)
    try:
        write_atomic(path, lambda f: fig.savefig(f, format=path.suffix[1:] or "png", dpi=dpi))
    finally:
        plt.close(fig)
    return path


@torch.no_grad()
def reconstruction_panels(model: torch.nn.Module, imgs: torch.Tensor,
                          noise: torch.Tensor | None = None) -> torch.Tensor:
    """Run the model and assemble the four panels per image, in [0, 1] RGB.

    Args:
        model: an MAE or CrossMAE model (not DDP-wrapped), any mode; evaluated as is.
        imgs: (N, 3, H, W) normalised images.
        noise: optional (N, L) masking noise, for reproducible masks.

    Returns:
        (N, 4, 3, H, W) panels in the order of COLUMNS.
    """
    out = model(imgs, noise=noise)
    target = model.patchify(imgs)  # (N, L, p*p*3)
    pred = out.pred.float()
    if getattr(model, "norm_pix_loss", False):  # undo the per-patch normalisation of the target
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        pred = pred * (var + 1.0e-6) ** 0.5 + mean
    visible = out.visible.float().unsqueeze(-1)  # (N, L, 1)
    # MAE reconstructs every position; CrossMAE only the predicted ones (the rest of pred is 0)
    reconstructed = out.pred.ne(0).any(dim=-1, keepdim=True).float()
    mean = torch.tensor(IMAGENET_MEAN, device=imgs.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=imgs.device).view(1, 3, 1, 1)

    def to_rgb(patches: torch.Tensor, show: torch.Tensor) -> torch.Tensor:
        img = model.unpatchify(patches) * std + mean
        keep = model.unpatchify(show.expand_as(patches))
        return (img * keep + _GREY * (1 - keep)).clamp(0, 1)

    panels = [
        (imgs * std + mean).clamp(0, 1),
        to_rgb(target, visible),
        to_rgb(pred, reconstructed),
        to_rgb(target * visible + pred * (1 - visible), torch.clamp(visible + reconstructed, max=1.0)),
    ]
    return torch.stack(panels, dim=1)


def save_reconstruction_grid(panels: torch.Tensor, path: str | Path, title: str = "") -> Path:
    """Write an N-row, 4-column PNG of `reconstruction_panels` output."""
    n = panels.shape[0]
    fig, axes = plt.subplots(n, 4, figsize=(8, 2 * n + 0.4), squeeze=False)
    for i in range(n):
        for j in range(4):
            ax = axes[i][j]
            ax.imshow(panels[i, j].permute(1, 2, 0).cpu().numpy())
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_title(COLUMNS[j], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path, dpi=100)
