"""ViTDet's decomposed relative position (MViTv2, arXiv 2112.01526): the per-axis table lookup, the explicit
(N, N) attention bias detectron2 adds to the logits, and the same attention with the bias folded into the query and
key channels, which never makes the (N, N) tensor."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["get_rel_pos", "rel_pos_bias", "folded_rel_pos_attention"]


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative-position embeddings for every (query, key) pair along one axis.

    Args:
        q_size: Query length along the axis.
        k_size: Key length along the axis.
        rel_pos: (L, C) table; linearly resized when L != 2 * max(q_size, k_size) - 1.

    Returns:
        (q_size, k_size, C).
    """
    length = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != length:
        rel_pos = F.interpolate(rel_pos.T[None], size=length, mode="linear")[0].T
    # The shorter axis is stretched so both index the same coordinate range (MViTv2).
    q_coords = torch.arange(q_size)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size)[None, :] * max(q_size / k_size, 1.0)
    offsets = q_coords - k_coords + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[offsets.long()]


def rel_pos_bias(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                 q_size: tuple[int, int], k_size: tuple[int, int]) -> torch.Tensor:
    """Decomposed relative-position attention bias of MViTv2 (arXiv 2112.01526), as used by ViTDet.

    Args:
        q: (..., q_h * q_w, C) unscaled queries.
        rel_pos_h: (Lh, C) table for the height axis.
        rel_pos_w: (Lw, C) table for the width axis.
        q_size: (q_h, q_w).
        k_size: (k_h, k_w).

    Returns:
        (..., q_h * q_w, k_h * k_w) bias to add to the attention logits.
    """
    (q_h, q_w), (k_h, k_w) = q_size, k_size
    r_q = q.reshape(*q.shape[:-2], q_h, q_w, q.shape[-1])
    rel_h = torch.einsum("...hwc,hkc->...hwk", r_q, get_rel_pos(q_h, k_h, rel_pos_h))
    rel_w = torch.einsum("...hwc,wkc->...hwk", r_q, get_rel_pos(q_w, k_w, rel_pos_w))
    bias = rel_h[..., :, None] + rel_w[..., None, :]
    return bias.reshape(*q.shape[:-2], q_h * q_w, k_h * k_w)


def folded_rel_pos_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_pos_h: torch.Tensor,
                             rel_pos_w: torch.Tensor, size: tuple[int, int], scale: float) -> torch.Tensor:
    """Attention with the decomposed relative position of `rel_pos_bias`, without making its (N, N) bias.

    The bias of query q and key k is `A[q, k_h] + B[q, k_w]` (k_h, k_w: the key's row and column), so it is the dot
    product of the query's extra channels `[A[q, :], B[q, :]]` with the key's one-hot channels `[e(k_h), e(k_w)]`.
    Appending those channels to the scaled queries and the keys gives the same logits in one fused
    `scaled_dot_product_attention` (scale 1), whose kernels never hold the N x N scores; the values are padded with
    zeros to the same width, which the fused CPU and CUDA kernels need, and the padding is cut off after.

    Args:
        q, k, v: (..., N, C) with N = h * w, queries unscaled.
        rel_pos_h, rel_pos_w: the (Lh, C) and (Lw, C) tables.
        size: the grid (h, w) of the N tokens (queries and keys).
        scale: the logits' scale of q . k (C ** -0.5).

    Returns:
        (..., N, C), equal to softmax(scale * q k^T + rel_pos_bias) v.
    """
    h, w = size
    r_q = q.reshape(*q.shape[:-2], h, w, q.shape[-1])
    rel_h = torch.einsum("...hwc,hkc->...hwk", r_q, get_rel_pos(h, h, rel_pos_h)).reshape(*q.shape[:-1], h)
    rel_w = torch.einsum("...hwc,wkc->...hwk", r_q, get_rel_pos(w, w, rel_pos_w)).reshape(*q.shape[:-1], w)
    rows = torch.arange(h * w, device=q.device) // w
    one_hot = torch.cat([F.one_hot(rows, h), F.one_hot(torch.arange(h * w, device=q.device) % w, w)], dim=-1)
    q2 = torch.cat([q * scale, rel_h, rel_w], dim=-1)
    k2 = torch.cat([k, one_hot.to(k.dtype).expand(*k.shape[:-1], h + w)], dim=-1)
    v2 = F.pad(v, (0, h + w))
    return F.scaled_dot_product_attention(q2, k2, v2, scale=1.0)[..., :v.shape[-1]]
