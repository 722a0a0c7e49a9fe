"""Fixed 2-D sine-cosine position embeddings (MAE's `get_2d_sincos_pos_embed` semantics)."""
from __future__ import annotations

import torch


def get_1d_sincos_pos_embed(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """Sine-cosine embedding of scalar positions.

    Args:
        embed_dim: output width, even.
        pos: (M,) positions.

    Returns:
        (M, embed_dim) float32: sines in the first half, cosines in the second.
    """
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding needs an even width, got {embed_dim}; pick an even embed_dim")
    # float32 throughout, as MAE's numpy version
    omega = torch.arange(embed_dim // 2, dtype=torch.float32) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.reshape(-1, 1).float() * omega  # (M, D/2)
    return torch.cat([out.sin(), out.cos()], dim=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int | tuple[int, int],
                            cls_token: bool = False) -> torch.Tensor:
    """2-D sine-cosine embedding of a patch grid, in row-major patch order.

    As in MAE, the first half of the channels encodes the column (x) index and the second half
    the row (y) index; the optional cls slot is all zeros.

    Args:
        embed_dim: output width, divisible by 4.
        grid_size: grid side, or (rows, cols).
        cls_token: prepend a zero row for the cls token.

    Returns:
        (rows*cols [+1], embed_dim) float32.
    """
    rows, cols = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    ys, xs = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    emb = torch.cat([get_1d_sincos_pos_embed(embed_dim // 2, xs),
                     get_1d_sincos_pos_embed(embed_dim // 2, ys)], dim=1)
    if cls_token:
        emb = torch.cat([emb.new_zeros(1, embed_dim), emb], dim=0)
    return emb
