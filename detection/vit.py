"""ViTDet backbone for detectron2: a plain ViT with windowed attention and a simple feature pyramid.

Follows detectron2's ViTDet (`detectron2/modeling/backbone/vit.py` and `utils.py`, facebookresearch/detectron2
main; "Exploring Plain Vision Transformer Backbones for Object Detection", arXiv 2203.16527) with the same
constructor arguments and state-dict keys, so LazyConfigs and checkpoints move between the two unchanged.
Differences: attention runs through `F.scaled_dot_product_attention` with the decomposed relative position
as an additive mask (`attn_impl="eager"` keeps the explicit softmax; `"folded"` folds the relative position into
the query and key channels, so no N x N bias is made: `folded_rel_pos_attention`), activation checkpointing uses
`torch.utils.checkpoint`, the channels-first "LN" norm that detectron2 v0.6 lacks is provided here, and
`SimpleFeaturePyramid` pads its input to `square_pad` itself, which detectron2 v0.6 does not do.
"""
from __future__ import annotations

import math
from typing import Callable

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm2d, Mlp, PatchEmbed, trunc_normal_
from torch.utils.checkpoint import checkpoint

from detectron2.layers import CNNBlockBase, Conv2d
from detectron2.layers import get_norm as _d2_get_norm
from detectron2.modeling.backbone import Backbone
from detectron2.modeling.backbone.fpn import _assert_strides_are_log2_contiguous

from .rel_pos import folded_rel_pos_attention, rel_pos_bias

__all__ = ["LayerNorm", "get_norm", "window_partition", "window_unpartition", "get_abs_pos", "Attention", "Block",
           "ViT", "SimpleFeaturePyramid"]

ATTN_IMPLS = ("sdpa", "eager", "folded")

# detectron2's channels-first LayerNorm (eps 1e-6, params `weight`, `bias`) is the same op as timm's LayerNorm2d.
LayerNorm = LayerNorm2d


def get_norm(norm: str | Callable[[int], nn.Module] | None, out_channels: int) -> nn.Module | None:
    """detectron2's `get_norm` plus "LN": a LayerNorm over C of an (N, C, H, W) tensor."""
    if norm == "LN":
        return LayerNorm(out_channels)
    return _d2_get_norm(norm, out_channels)


def window_partition(x: torch.Tensor, window_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Split (B, H, W, C) into non-overlapping windows, zero-padding H and W up to multiples of the window.

    Returns:
        Windows (B * num_windows, window_size, window_size, C) and the padded size (Hp, Wp).
    """
    b, h, w, c = x.shape
    pad_h, pad_w = -h % window_size, -w % window_size
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window_size, window_size, wp // window_size, window_size, c)
    return x.transpose(2, 3).reshape(-1, window_size, window_size, c), (hp, wp)


def window_unpartition(windows: torch.Tensor, window_size: int, pad_hw: tuple[int, int],
                       hw: tuple[int, int]) -> torch.Tensor:
    """Inverse of `window_partition`: (B * num_windows, ws, ws, C) -> (B, H, W, C) with the padding removed."""
    (hp, wp), (h, w) = pad_hw, hw
    x = windows.view(-1, hp // window_size, wp // window_size, window_size, window_size, windows.shape[-1])
    x = x.transpose(2, 3).reshape(x.shape[0], hp, wp, -1)
    return x[:, :h, :w].contiguous()


def get_abs_pos(abs_pos: torch.Tensor, has_cls_token: bool, hw: tuple[int, int]) -> torch.Tensor:
    """Absolute position embedding at the pretraining grid, without its cls slot, resized (bicubic) to `hw`.

    Args:
        abs_pos: (1, [1 +] S * S, C) embedding of a square S x S pretraining grid.
        has_cls_token: Whether slot 0 of `abs_pos` belongs to the cls token.
        hw: Target grid (H, W).

    Returns:
        (1, H, W, C).
    """
    if has_cls_token:
        abs_pos = abs_pos[:, 1:]
    size = math.isqrt(abs_pos.shape[1])
    if size * size != abs_pos.shape[1]:
        raise ValueError(f"pos_embed has {abs_pos.shape[1]} patch slots, not a square grid; "
                         "check pretrain_img_size, patch_size and pretrain_use_cls_token")
    grid = abs_pos.reshape(1, size, size, -1)
    if (size, size) == tuple(hw):
        return grid
    grid = F.interpolate(grid.permute(0, 3, 1, 2), size=hw, mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1)


class Attention(nn.Module):
    """Multi-head self-attention over a (B, H, W, C) grid with optional decomposed relative position."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, use_rel_pos: bool = False,
                 rel_pos_zero_init: bool = True, input_size: tuple[int, int] | None = None,
                 attn_impl: str = "sdpa") -> None:
        super().__init__()
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl={attn_impl!r} is not supported; use one of {ATTN_IMPLS}")
        self.num_heads = num_heads
        self.attn_impl = attn_impl
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))
            if not rel_pos_zero_init:
                trunc_normal_(self.rel_pos_h, std=0.02)
                trunc_normal_(self.rel_pos_w, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        b, h, w, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        if self.use_rel_pos and self.attn_impl == "folded":
            x = folded_rel_pos_attention(q, k, v, self.rel_pos_h, self.rel_pos_w, (h, w), self.scale)
            return self.proj(x.transpose(1, 2).reshape(b, h, w, -1))
        bias = None
        if self.use_rel_pos:  # (B, heads, HW, HW), from the unscaled queries as in ViTDet
            bias = rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (h, w), (h, w)).to(q.dtype)
        if self.attn_impl in ("sdpa", "folded"):  # folded without relative positions is plain SDPA
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if bias is not None:
                attn = attn + bias
            x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(b, h, w, -1))


class ResBottleneckBlock(CNNBlockBase):
    """1x1 -> 3x3 -> 1x1 conv bottleneck with "LN" norms, added residually; last norm zero-initialised."""

    def __init__(self, in_channels: int, out_channels: int, bottleneck_channels: int, norm: str = "LN",
                 act_layer: type[nn.Module] = nn.GELU) -> None:
        super().__init__(in_channels, out_channels, 1)
        self.conv1 = Conv2d(in_channels, bottleneck_channels, 1, bias=False)
        self.norm1 = get_norm(norm, bottleneck_channels)
        self.act1 = act_layer()
        self.conv2 = Conv2d(bottleneck_channels, bottleneck_channels, 3, padding=1, bias=False)
        self.norm2 = get_norm(norm, bottleneck_channels)
        self.act2 = act_layer()
        self.conv3 = Conv2d(bottleneck_channels, out_channels, 1, bias=False)
        self.norm3 = get_norm(norm, out_channels)
        for layer in (self.conv1, self.conv2, self.conv3):
            weight_init.c2_msra_fill(layer)
        nn.init.zeros_(self.norm3.weight)
        nn.init.zeros_(self.norm3.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        out = x
        for layer in self.children():
            out = layer(out)
        return x + out


class Block(nn.Module):
    """Pre-norm transformer block; windowed attention when `window_size > 0`, else global."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0, norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
                 act_layer: type[nn.Module] = nn.GELU, use_rel_pos: bool = False, rel_pos_zero_init: bool = True,
                 window_size: int = 0, use_residual_block: bool = False,
                 input_size: tuple[int, int] | None = None, attn_impl: str = "sdpa") -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, use_rel_pos, rel_pos_zero_init,
                              input_size if window_size == 0 else (window_size, window_size), attn_impl)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer)
        self.window_size = window_size
        self.use_residual_block = use_residual_block
        if use_residual_block:
            self.residual = ResBottleneckBlock(dim, dim, dim // 2, norm="LN", act_layer=act_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            hw = x.shape[1:3]
            x, pad_hw = window_partition(x, self.window_size)
        x = self.attn(x)
        if self.window_size > 0:
            x = window_unpartition(x, self.window_size, pad_hw, hw)
        x = shortcut + self.drop_path(x)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        if self.use_residual_block:
            x = self.residual(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x


class ViT(Backbone):
    """Plain ViT backbone of ViTDet; outputs `{out_feature: (B, embed_dim, H / patch, W / patch)}`.

    Args are detectron2's (see its `ViT`); `attn_impl` picks the attention kernel ("sdpa": an additive N x N mask;
    "eager": detectron2's explicit softmax; "folded": `folded_rel_pos_attention`, no N x N tensor), and
    `freeze=True` (not in detectron2) keeps every ViT weight fixed and the ViT in eval mode (no drop path), so
    only the pyramid and the heads learn: the frozen-backbone evaluation of a pretrained encoder.
    `pos_embed` keeps its pretraining shape (1, [1 +] (pretrain_img_size // patch_size) ** 2, embed_dim)
    and is resized at forward time; `img_size` only sizes the relative-position tables of global blocks.
    """

    def __init__(self, img_size: int = 1024, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path_rate: float = 0.0, norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
                 act_layer: type[nn.Module] = nn.GELU, use_abs_pos: bool = True, use_rel_pos: bool = False,
                 rel_pos_zero_init: bool = True, window_size: int = 0, window_block_indexes: tuple[int, ...] = (),
                 residual_block_indexes: tuple[int, ...] = (), use_act_checkpoint: bool = False,
                 pretrain_img_size: int = 224, pretrain_use_cls_token: bool = True,
                 out_feature: str = "last_feat", attn_impl: str = "sdpa", freeze: bool = False) -> None:
        super().__init__()
        self.pretrain_use_cls_token = pretrain_use_cls_token
        self.use_act_checkpoint = use_act_checkpoint
        self.patch_embed = PatchEmbed(img_size=None, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim, output_fmt="NHWC", strict_img_size=False)
        if use_abs_pos:
            num_positions = (pretrain_img_size // patch_size) ** 2 + int(pretrain_use_cls_token)
            self.pos_embed = nn.Parameter(torch.zeros(1, num_positions, embed_dim))
            trunc_normal_(self.pos_embed, std=0.02)
        else:
            self.pos_embed = None
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()  # stochastic depth decay rule
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, dpr[i], norm_layer, act_layer, use_rel_pos,
                  rel_pos_zero_init, window_size if i in window_block_indexes else 0,
                  i in residual_block_indexes, (img_size // patch_size, img_size // patch_size), attn_impl)
            for i in range(depth))
        self._out_feature_channels = {out_feature: embed_dim}
        self._out_feature_strides = {out_feature: patch_size}
        self._out_features = [out_feature]
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.freeze = freeze
        if freeze:
            self.requires_grad_(False)
            self.eval()

    def train(self, mode: bool = True) -> "ViT":
        """`nn.Module.train`, except that a frozen ViT stays in eval mode."""
        return super().train(mode and not self.freeze)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, in_chans, H, W) -> {out_feature: (B, embed_dim, H // patch_size, W // patch_size)}."""
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + get_abs_pos(self.pos_embed, self.pretrain_use_cls_token, (x.shape[1], x.shape[2]))
        for blk in self.blocks:
            if self.use_act_checkpoint and self.training:
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return {self._out_features[0]: x.permute(0, 3, 1, 2)}


class SimpleFeaturePyramid(Backbone):
    """ViTDet's simple feature pyramid: one deconv / identity / max-pool stage per scale factor on one map.

    Args:
        net: Backbone giving `in_feature`.
        in_feature: Name of the single-scale feature of `net`.
        out_channels: Channels of every pyramid level.
        scale_factors: Subset of (4.0, 2.0, 1.0, 0.5), giving strides `stride / scale`.
        top_block: Optional extra levels (e.g. detectron2's `LastLevelMaxPool` for p6).
        norm: Norm of the output convs ("LN" in ViTDet).
        square_pad: If > 0, every input is padded (bottom and right, with zeros) to this square before the ViT,
            as ViTDet, whose detectron2 pads the normalised batch to `padding_constraints["square_size"]`.
            detectron2 v0.6 never reads `padding_constraints` and pads only to `size_divisibility`, so the
            pyramid pads here on every version; an input that already is square_pad x square_pad is untouched.
            Padding the bottom and right keeps the image's coordinates, so boxes need no shift.
    """

    def __init__(self, net: Backbone, in_feature: str, out_channels: int, scale_factors: tuple[float, ...],
                 top_block: nn.Module | None = None, norm: str = "LN", square_pad: int = 0) -> None:
        super().__init__()
        if not isinstance(net, Backbone):
            raise TypeError(f"net must be a detectron2 Backbone, got {type(net).__name__}")
        self.scale_factors = scale_factors
        in_shape = net.output_shape()[in_feature]
        strides = [int(in_shape.stride / scale) for scale in scale_factors]
        _assert_strides_are_log2_contiguous(strides)
        dim, use_bias = in_shape.channels, norm == ""
        self.stages = []
        for scale, stride in zip(scale_factors, strides):
            if scale == 4.0:
                layers = [nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2), get_norm(norm, dim // 2),
                          nn.GELU(), nn.ConvTranspose2d(dim // 2, dim // 4, kernel_size=2, stride=2)]
                out_dim = dim // 4
            elif scale == 2.0:
                layers, out_dim = [nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2)], dim // 2
            elif scale == 1.0:
                layers, out_dim = [], dim
            elif scale == 0.5:
                layers, out_dim = [nn.MaxPool2d(kernel_size=2, stride=2)], dim
            else:
                raise ValueError(f"scale factor {scale} is not supported; use values from (4.0, 2.0, 1.0, 0.5)")
            layers += [Conv2d(out_dim, out_channels, kernel_size=1, bias=use_bias, norm=get_norm(norm, out_channels)),
                       Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=use_bias,
                              norm=get_norm(norm, out_channels))]
            stage = nn.Sequential(*layers)
            self.add_module(f"simfp_{int(math.log2(stride))}", stage)  # keys simfp_2..simfp_5 as in ViTDet
            self.stages.append(stage)
        self.net = net
        self.in_feature = in_feature
        self.top_block = top_block
        self._out_feature_strides = {f"p{int(math.log2(s))}": s for s in strides}
        if top_block is not None:
            last = int(math.log2(strides[-1]))
            for s in range(last + 1, last + 1 + top_block.num_levels):
                self._out_feature_strides[f"p{s}"] = 2**s
        self._out_features = list(self._out_feature_strides)
        self._out_feature_channels = {k: out_channels for k in self._out_features}
        self._size_divisibility = strides[-1]
        self._square_pad = square_pad

    @property
    def size_divisibility(self) -> int:
        return self._size_divisibility

    @property
    def padding_constraints(self) -> dict[str, int]:
        return {"size_divisibility": self._size_divisibility, "square_size": self._square_pad}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(N, C, H, W), H and W multiples of `size_divisibility` -> {"p2": (N, out, H' / 4, W' / 4), ...}.

        H' = max(H, square_pad) and W' = max(W, square_pad): a side shorter than `square_pad` is zero-padded
        (zero is ViTDet's padding value: the image is already normalised), a longer one is left as it is.
        """
        pad_h, pad_w = max(self._square_pad - x.shape[-2], 0), max(self._square_pad - x.shape[-1], 0)
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        bottom_up = self.net(x)
        results = [stage(bottom_up[self.in_feature]) for stage in self.stages]
        if self.top_block is not None:
            name = self.top_block.in_feature
            top_in = bottom_up[name] if name in bottom_up else results[self._out_features.index(name)]
            results.extend(self.top_block(top_in))
        return dict(zip(self._out_features, results))
