"""What a pretrained decoder does: attention of MAE's mask tokens, CrossMAE's feature-map weights.

MAE (CrossMAE paper, Table 6: ViT-B mask tokens give 1.42 to visible tokens and 0.39 to mask tokens, summed
over the 8 decoder blocks). Two statistics of the same softmax probabilities, per decoder block, for
mask-token queries:

- per key (the default, Table 6's): the attention one mask-token query puts on one key of a group, averaged
  over the queries (and images) and over the keys of the group, summed over heads. The visible group is the
  1 + len_keep keys of cls and the visible patches, the mask group the L - len_keep mask tokens. The paper's
  text defining it could not be read here; its figures fit this reading: a block's heads give each query a
  total of `num_heads`, so 50 * visible + 147 * mask summed over blocks must be 8 blocks * 16 heads = 128 for
  ViT-B/16 at mask ratio 0.75, and 50 * 1.42 + 147 * 0.39 = 128.3 (with 49 visible keys, cls left out: 126.9).
- mass (`*_mass`): the softmax probability a mask-token query puts on the whole group, averaged over heads,
  queries and images; the two groups add up to 1 in every block.

The cls token counts as visible: its decoder input is the encoder's cls output, computed from the visible
patches only. Its share is also reported on its own, so the convention that leaves it out can be read off the
same run.

CrossMAE has no self-attention between mask tokens; what it learns about depth is the inter-block
weighting `wfm.linear.weight`: (decoder block, encoder feature map).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from timm.models.vision_transformer import Attention

from ..models import MAE, CrossMAE
from ..models.encoder import shuffle_from_noise

KEY_GROUPS = ("cls", "visible_patches", "mask")  # decoder key tokens, in the order of the group ids
CLS, VISIBLE, MASK = range(3)


# ----------------------------------------------------------------------------- MAE attention mass

def attention_probabilities(attn: Attention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Recompute the softmax probabilities of a timm `Attention` (whose fused SDPA hides them).

    Args:
        attn: the block's attention module.
        x: (N, T, C) its input, i.e. the output of the block's `norm1`.

    Returns:
        probs: (N, H, T, T) attention probabilities, each row summing to 1.
        v: (N, H, T, head_dim) values, so that `attention_output(attn, probs, v)` is `attn(x)`.
    """
    n, t, _ = x.shape
    qkv = attn.qkv(x).reshape(n, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    probs = ((q * attn.scale) @ k.transpose(-2, -1)).float().softmax(dim=-1)
    return probs, v


def attention_output(attn: Attention, probs: torch.Tensor, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """What `attn(x)` returns, rebuilt from `attention_probabilities(attn, x)`; (N, T, C)."""
    n, _, t, _ = probs.shape
    out = (probs.to(v.dtype) @ v).transpose(1, 2).reshape(n, t, attn.attn_dim)
    out = attn.norm(out)
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(x).sigmoid()
    return attn.proj(out)


def decoder_token_groups(ids_restore: torch.Tensor, len_keep: int) -> torch.Tensor:
    """Kind of every MAE decoder token: cls first, then the patches in natural order.

    Args:
        ids_restore: (N, L) rank of each patch in the shuffled order (see `shuffle_from_noise`).
        len_keep: number of visible patches (the first `len_keep` of the shuffled order).

    Returns:
        (N, 1 + L) long: CLS, VISIBLE or MASK.
    """
    patches = torch.where(ids_restore < len_keep, VISIBLE, MASK)
    return torch.cat([patches.new_full((patches.shape[0], 1), CLS), patches], dim=1)


def mass_by_key_group(probs: torch.Tensor, groups: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Attention mass on each kind of key, summed over images, heads and the selected queries.

    Args:
        probs: (N, H, T, T) attention probabilities.
        groups: (N, T) long, the kind (0..len(KEY_GROUPS)-1) of every token.
        queries: (N, T) bool, the query tokens to count.

    Returns:
        (len(KEY_GROUPS),) float64 sums; divided by `H * queries.sum()` they are mean masses.
    """
    one_hot = nn.functional.one_hot(groups, len(KEY_GROUPS)).to(probs.dtype)  # (N, T, G)
    per_query = probs @ one_hot.unsqueeze(1)  # (N, H, T, G)
    return (per_query * queries[:, None, :, None]).sum(dim=(0, 1, 2)).double()


@torch.no_grad()
def mae_attention_mass(model: MAE, imgs: torch.Tensor, noise: torch.Tensor,
                       verify: bool = False) -> tuple[torch.Tensor, int]:
    """Run `model` on a batch and reduce each decoder block's attention of mask tokens at once.

    Forward hooks on every `decoder_blocks[i].attn` (whose input is the output of `norm1`) recompute
    the probabilities; only the per-group sums are kept, never the maps.

    Args:
        model: an MAE in eval mode.
        imgs: (N, C, H, W) normalised images.
        noise: (N, L) masking noise; the smallest `model.num_visible()` per row are visible.
        verify: check that the recomputed probabilities reproduce each block's attention output.

    Returns:
        sums: (decoder_depth, len(KEY_GROUPS)) float64 mass of mask-token queries on each key kind,
            summed over images, heads and mask-token queries.
        count: the number of (image, head, mask query) triples behind each row.
    """
    _, ids_restore = shuffle_from_noise(noise)
    groups = decoder_token_groups(ids_restore, model.num_visible()).to(imgs.device)
    queries = groups == MASK
    sums: list[torch.Tensor | None] = [None] * len(model.decoder_blocks)

    def hook_for(i: int):
        def hook(attn: Attention, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = args[0]
            probs, v = attention_probabilities(attn, x)
            if verify:
                rebuilt = attention_output(attn, probs, v, x)
                if not torch.allclose(rebuilt.float(), output.float(), rtol=1e-3, atol=1e-4):
                    raise RuntimeError(f"recomputed attention of decoder block {i} does not reproduce its "
                                       "output; timm's Attention may have changed, check attention_probabilities")
            sums[i] = mass_by_key_group(probs, groups, queries)
        return hook

    handles = [blk.attn.register_forward_hook(hook_for(i)) for i, blk in enumerate(model.decoder_blocks)]
    try:
        model(imgs, noise=noise)
    finally:
        for h in handles:
            h.remove()
    count = int(queries.sum()) * model.decoder_blocks[0].attn.num_heads
    return torch.stack(sums).cpu(), count


class AttentionMass:
    """Running mean of `mae_attention_mass` over batches: constant memory, any number of images."""

    def __init__(self, depth: int) -> None:
        self.sums = torch.zeros(depth, len(KEY_GROUPS), dtype=torch.float64)
        self.count = 0
        self.images = 0

    def add(self, sums: torch.Tensor, count: int, images: int) -> None:
        self.sums += sums
        self.count += count
        self.images += images

    def means(self) -> torch.Tensor:
        """(depth, len(KEY_GROUPS)) mean mass per mask-token query and head, per key kind."""
        if self.count == 0:
            raise ValueError("no images were analysed")
        return self.sums / self.count


def per_key_attention(means: torch.Tensor, num_heads: int, len_keep: int, num_patches: int) -> torch.Tensor:
    """Table 6's statistic from the mean masses: attention per key of each group, summed over heads.

    Args:
        means: (depth, len(KEY_GROUPS)) mean mass per mask-token query and head (`AttentionMass.means()`).
        num_heads: heads of each decoder block.
        len_keep: visible patches per image.
        num_patches: L, patches per image.

    Returns:
        (depth, 2) float64: per block, [visible (cls + visible patches, 1 + len_keep keys), mask
        (L - len_keep keys)].
    """
    visible = (means[:, CLS] + means[:, VISIBLE]) / (1 + len_keep)
    mask = means[:, MASK] / (num_patches - len_keep)
    return torch.stack([visible, mask], dim=1) * num_heads


def attention_mass_rows(means: torch.Tensor, num_heads: int, len_keep: int, num_patches: int) -> list[dict[str, Any]]:
    """Table rows, one per decoder block and a final "sum" over blocks (the paper's Table 6 totals).

    Columns: `visible` and `mask`, the per-key attention summed over heads (Table 6's statistic, see
    `per_key_attention`); then the per-query masses `visible_mass` (patches + cls) and `mask_mass`, which add up
    to 1 per block, and the split of `visible_mass` into `visible_patches_mass` and `cls_mass`.
    """
    per_key = per_key_attention(means, num_heads, len_keep, num_patches).tolist()
    rows = []
    for i, (m, k) in enumerate(zip(means.tolist(), per_key)):
        rows.append({"block": str(i), "visible": k[0], "mask": k[1], "visible_mass": m[CLS] + m[VISIBLE],
                     "mask_mass": m[MASK], "visible_patches_mass": m[VISIBLE], "cls_mass": m[CLS]})
    rows.append({"block": "sum", **{c: sum(r[c] for r in rows) for c in rows[0] if c != "block"}})
    return rows


# ----------------------------------------------------------------------------- CrossMAE weights

def feature_weights(model: CrossMAE) -> tuple[torch.Tensor, list[str], list[str]]:
    """CrossMAE's learned inter-block weights.

    Returns:
        weights: (decoder_depth, k) copy of `wfm.linear.weight`; row i mixes the feature maps
            that decoder block i attends to.
        rows: decoder block labels, "decoder 0".."decoder D-1".
        columns: feature map labels: "input" (embedded patches, if `use_input`), then
            "block i" for encoder block i (0-based, as `use_fm`).
    """
    weights = model.wfm.linear.weight.detach().float().cpu().clone()
    columns = (["input"] if model.use_input else []) + [f"block {i}" for i in model.use_fm]
    rows = [f"decoder {i}" for i in range(weights.shape[0])]
    return weights, rows, columns
