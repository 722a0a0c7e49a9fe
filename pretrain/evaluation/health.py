"""Feature health: whether an encoder's features are inflated or collapsed, at a glance.

Pretraining can grow a few near-constant channels that dominate every token (one measured case: channel means of
110 against per-channel standard deviations of 4-12 after 768 MAE steps at the demo's scale), or collapse tokens
onto one direction. Both are visible in four numbers per block: the overall standard deviation; the largest
per-channel mean (in absolute value) against the median per-channel standard deviation ("dominance"); and the
mean and relative spread of the tokens' L2 norms.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..models.encoder import MaskedViTEncoder

__all__ = ["token_stats", "encoder_health", "health_line"]


def token_stats(tokens: torch.Tensor) -> dict[str, float]:
    """Statistics of a (N, L, D) tensor of tokens (or any (..., D)), over every token.

    Returns:
        {"std": of all values, "max_channel_mean": the largest |mean| of a channel, "median_channel_std": the median
         over channels of a channel's std, "dominance": their ratio, "token_norm": mean L2 norm of a token,
         "token_norm_spread": std / mean of the token norms}
    """
    x = tokens.detach().reshape(-1, tokens.shape[-1]).double()
    channel_mean, channel_std = x.mean(0), x.std(0)
    norms = x.norm(dim=1)
    median_std = float(channel_std.median())
    return {"std": float(x.std()), "max_channel_mean": float(channel_mean.abs().max()),
            "median_channel_std": median_std,
            "dominance": float(channel_mean.abs().max()) / max(median_std, 1e-12),
            "token_norm": float(norms.mean()), "token_norm_spread": float(norms.std() / norms.mean().clamp_min(1e-12))}


@torch.no_grad()
def encoder_health(encoder: MaskedViTEncoder, imgs: torch.Tensor, blocks: Sequence[int] | None = None
                   ) -> list[dict[str, float]]:
    """`token_stats` of the patch tokens (cls left out) of the embedded input and of each block's output.

    Args:
        encoder: an MAE / CrossMAE model or a bare encoder, in eval mode.
        imgs: (N, 3, H, W) normalised images at the encoder's input size.
        blocks: which of the depth + 1 maps (0: the embedded input, i: block i - 1's output); default all.

    Returns:
        One dict per map, with its index under "map".
    """
    ids = torch.arange(encoder.num_patches, device=imgs.device).expand(imgs.shape[0], -1)
    feats = encoder.forward_features(imgs, ids)
    chosen = range(len(feats)) if blocks is None else blocks
    return [{"map": i, **token_stats(feats[i][:, 1:].float())} for i in chosen]


def health_line(stats: dict[str, float]) -> str:
    """'std 25.8, largest channel mean 110.0 = 22.0 x the median channel std, token norm 360.1 ± 12%'."""
    return (f"std {stats['std']:.1f}, largest channel mean {stats['max_channel_mean']:.1f} = "
            f"{stats['dominance']:.1f} x the median channel std, token norm {stats['token_norm']:.1f} "
            f"± {100 * stats['token_norm_spread']:.0f}%")
