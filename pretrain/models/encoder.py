"""The ViT encoder, masking and loss target shared by MAE and CrossMAE.

Layer and parameter names follow timm and the official MAE code (`patch_embed.proj`, `cls_token`,
`pos_embed`, `blocks.{i}.*`, `norm`), so official checkpoints load unconverted.
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple

import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from .pos_embed import get_2d_sincos_pos_embed

# ViT / MAE LayerNorm
norm_layer = partial(nn.LayerNorm, eps=1e-6)


class MaskedOutput(NamedTuple):
    """What MAE and CrossMAE return.

    Attributes:
        loss: scalar mean squared error over the patches in `mask`.
        pred: (N, L, p*p*C) reconstruction at every patch position in natural order, in
            normalised-pixel space when `norm_pix_loss`; positions a CrossMAE model did not
            predict are 0.
        mask: (N, L) float, 1 where the patch is in the loss (MAE: masked; CrossMAE: predicted).
        visible: (N, L) bool, True where the encoder saw the patch.
    """

    loss: torch.Tensor
    pred: torch.Tensor
    mask: torch.Tensor
    visible: torch.Tensor


def shuffle_from_noise(noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample patch order from noise, as in MAE: ascending noise comes first.

    Args:
        noise: (N, L) any real values.

    Returns:
        ids_shuffle: (N, L) patch indices in shuffled order.
        ids_restore: (N, L) rank of each patch in the shuffled order (inverse permutation).
    """
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    return ids_shuffle, ids_restore


class MaskedViTEncoder(nn.Module):
    """ViT encoder over the visible patches; MAE and CrossMAE subclass it and add a decoder.

    Args:
        img_size: input side (or (H, W)).
        patch_size: patch side.
        in_chans: image channels.
        embed_dim: encoder width.
        depth: number of encoder blocks.
        num_heads: encoder attention heads.
        mlp_ratio: MLP hidden width / width.
        final_norm: end in a LayerNorm `norm` (MAE does; CrossMAE's released code does not).
        mask_ratio: fraction of patches hidden from the encoder.
        norm_pix_loss: regress per-patch normalised pixels.
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 1024, depth: int = 24, num_heads: int = 16, mlp_ratio: float = 4.0,
                 final_norm: bool = True, mask_ratio: float = 0.75, norm_pix_loss: bool = True) -> None:
        super().__init__()
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # a frozen Parameter rather than a buffer, as official, so checkpoints match key for key
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(depth)])
        self.norm = norm_layer(embed_dim) if final_norm else None

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    def initialize_weights(self) -> None:
        """Official MAE init, in its order (so the same seed draws the same weights).

        Subclasses call it once their decoder exists; both decoders define `decoder_pos_embed`
        (1, 1 + L, decoder width) and `mask_token` (1, 1, decoder width).
        """
        grid = self.patch_embed.grid_size
        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid, cls_token=True)
        self.pos_embed.data.copy_(pos_embed[None])
        self.decoder_pos_embed.data.copy_(
            get_2d_sincos_pos_embed(self.decoder_pos_embed.shape[-1], grid, cls_token=True)[None])
        # patch_embed initialised like nn.Linear rather than nn.Conv2d
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        # timm's trunc_normal_(std=.02) is effectively normal_(std=.02): the cutoff (2.) is far out
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(_init_module)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, L, p*p*C), each patch flattened in (p, p, C) order as official."""
        p = self.patch_embed.patch_size[0]
        n, c, h, w = imgs.shape
        x = imgs.reshape(n, c, h // p, p, w // p, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(n, (h // p) * (w // p), p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, p*p*C) -> (N, C, H, W), the inverse of `patchify` on this model's grid."""
        p = self.patch_embed.patch_size[0]
        gh, gw = self.patch_embed.grid_size
        c = x.shape[-1] // (p * p)
        x = x.reshape(x.shape[0], gh, gw, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, gh * p, gw * p)

    def num_visible(self) -> int:
        """Patches the encoder sees: `int(L * (1 - mask_ratio))`, as official."""
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        return int(self.num_patches * (1 - self.mask_ratio))

    def shuffle(self, imgs: torch.Tensor, noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """`shuffle_from_noise` on `noise`, or on fresh uniform noise (as official) when None."""
        shape = (imgs.shape[0], self.num_patches)
        if noise is None:
            noise = torch.rand(shape, device=imgs.device)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected (N, L) = {shape}")
        return shuffle_from_noise(noise)

    def forward_features(self, imgs: torch.Tensor, ids_keep: torch.Tensor) -> list[torch.Tensor]:
        """Encode the kept patches of each image.

        Args:
            imgs: (N, C, H, W).
            ids_keep: (N, K) indices of the visible patches, in the order they are fed.

        Returns:
            depth + 1 tensors of shape (N, 1 + K, D), cls first: the embedded input, then the
            output of each block (before `norm`).
        """
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        feats = [torch.cat([cls, x], dim=1)]
        for blk in self.blocks:
            feats.append(blk(feats[-1]))
        return feats

    def target(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, L, p*p*C) regression target, per-patch normalised if `norm_pix_loss`."""
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target


def _init_module(m: nn.Module) -> None:
    # xavier_uniform following the official JAX ViT, as MAE
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.constant_(m.bias, 0)
    elif isinstance(m, nn.LayerNorm):
        nn.init.constant_(m.bias, 0)
        nn.init.constant_(m.weight, 1.0)
