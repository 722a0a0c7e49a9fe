"""CrossMAE (Fu et al. 2024, arXiv 2401.14391): the shared ViT encoder plus a cross-attention decoder.

Mirrors the released `models_cross.py` (TonyLianLong/CrossMAE) run with feature weighting
(`--weight_fm`) and the input map (`--use_input`): same modules, names and masking, so its
checkpoints load with strict=True. Each query is the shared `mask_token` plus the decoder
position embedding of one predicted patch; without decoder self-attention the queries never see
each other, so each prediction depends only on its position and the visible patches.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import Attention

from .encoder import MaskedOutput, MaskedViTEncoder, norm_layer


class CrossAttention(nn.Module):
    """Multi-head attention of decoder queries over encoder tokens.

    Args:
        encoder_dim: width of the keys/values source.
        decoder_dim: width of the queries and output.
        num_heads: attention heads; must divide `decoder_dim`.
    """

    def __init__(self, encoder_dim: int, decoder_dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(decoder_dim, decoder_dim, bias=True)
        self.kv = nn.Linear(encoder_dim, decoder_dim * 2, bias=True)
        self.proj = nn.Linear(decoder_dim, decoder_dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(N, Q, decoder_dim) queries, (N, T, encoder_dim) tokens -> (N, Q, decoder_dim)."""
        n, nq, c = x.shape
        h = self.num_heads
        q = self.q(x).reshape(n, nq, h, c // h).transpose(1, 2)
        k, v = self.kv(y).reshape(n, y.shape[1], 2, h, c // h).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, nq, c))


class CrossAttentionBlock(nn.Module):
    """Pre-norm [self-attention,] cross-attention and MLP, each residual.

    Args:
        encoder_dim: width of the encoder features attended to.
        decoder_dim: width of the queries.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / decoder_dim.
        self_attn: add self-attention among the queries before the cross-attention (paper ablation).
    """

    def __init__(self, encoder_dim: int, decoder_dim: int, num_heads: int, mlp_ratio: float = 4.0,
                 self_attn: bool = False) -> None:
        super().__init__()
        if self_attn:
            self.norm0 = norm_layer(decoder_dim)
            self.self_attn = Attention(decoder_dim, num_heads, qkv_bias=True)
        else:
            self.self_attn = None
        self.norm1 = norm_layer(decoder_dim)
        self.cross_attn = CrossAttention(encoder_dim, decoder_dim, num_heads)
        self.norm2 = norm_layer(decoder_dim)
        self.mlp = Mlp(decoder_dim, int(decoder_dim * mlp_ratio))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(N, Q, decoder_dim) queries, (N, T, encoder_dim) normalised features -> (N, Q, decoder_dim)."""
        if self.self_attn is not None:
            x = x + self.self_attn(self.norm0(x))
        x = x + self.cross_attn(self.norm1(x), y)
        return x + self.mlp(self.norm2(x))


class WeightedFeatureMaps(nn.Module):
    """Inter-block attention: one learned linear mix (no softmax) of k feature maps per decoder block.

    `linear.weight` (decoder_depth, k) holds the mixing weights, row i for decoder block i. The official code
    applies `linear` to the k maps stacked into one (N, T, D, k) tensor; this sums the weighted maps instead, which
    computes the same without that copy of every map (kept alive for the backward pass).
    """

    def __init__(self, k: int, decoder_depth: int) -> None:
        super().__init__()
        # The official constructor draws normal(std=1/sqrt(k)), but the model-wide init that follows
        # re-initialises every nn.Linear with xavier_uniform; that is what released runs started from.
        self.linear = nn.Linear(k, decoder_depth, bias=False)

    def forward(self, feats: Sequence[torch.Tensor], block: int) -> torch.Tensor:
        """k tensors (N, T, D) -> (N, T, D), the mix that decoder block `block` reads."""
        weights = self.linear.weight[block]
        mix = feats[0] * weights[0]
        for feat, weight in zip(feats[1:], weights[1:]):
            mix = torch.addcmul(mix, feat, weight)
        return mix


class CrossMAE(MaskedViTEncoder):
    """Masked autoencoder whose decoder reconstructs a subset of the masked patches by cross-attention.

    Args:
        img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, mask_ratio,
            norm_pix_loss: see `MaskedViTEncoder`.
        decoder_embed_dim: decoder (query) width.
        decoder_depth: number of decoder blocks.
        decoder_num_heads: decoder attention heads.
        prediction_ratio: fraction of all patches reconstructed (official `kept_mask_ratio`);
            at most `mask_ratio`.
        use_input: feed the embedded input tokens to the feature weighting as well.
        use_fm: encoder blocks whose outputs are weighted (negative counts from the end);
            None = all. A lone -1 here is the last block; the official `--use_fm -1` (all blocks) reaches
            this argument as None through `pretrain.models.model_use_fm`.
        decoder_self_attn: self-attention among the queries in every decoder block.
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 1024, depth: int = 24, num_heads: int = 16,
                 decoder_embed_dim: int = 512, decoder_depth: int = 12, decoder_num_heads: int = 16,
                 mlp_ratio: float = 4.0, mask_ratio: float = 0.75, prediction_ratio: float = 0.75,
                 norm_pix_loss: bool = True, use_input: bool = True, use_fm: Sequence[int] | None = None,
                 decoder_self_attn: bool = False) -> None:
        super().__init__(img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio,
                         final_norm=False, mask_ratio=mask_ratio, norm_pix_loss=norm_pix_loss)
        self.prediction_ratio = prediction_ratio
        self.use_input = use_input
        if use_fm is None:
            use_fm = range(depth)
        if any(not -depth <= i < depth for i in use_fm):
            raise ValueError(f"use_fm {list(use_fm)} names blocks outside the encoder's {depth}")
        self.use_fm = sorted({i % depth for i in use_fm})
        self.dec_norms = nn.ModuleList([norm_layer(embed_dim) for _ in range(decoder_depth)])
        self.wfm = WeightedFeatureMaps(len(self.use_fm) + int(use_input), decoder_depth)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_blocks = nn.ModuleList([
            CrossAttentionBlock(embed_dim, decoder_embed_dim, decoder_num_heads, mlp_ratio, decoder_self_attn)
            for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans, bias=True)
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, decoder_embed_dim),
                                              requires_grad=False)
        self.initialize_weights()

    def num_predicted(self) -> int:
        """Patches reconstructed, rounded as official.

        The official code floors the count of masked-but-not-predicted patches, and the predicted
        ones take the rest: `L - len_keep - int(L * (mask_ratio - prediction_ratio))`.
        """
        if not 0.0 < self.prediction_ratio <= self.mask_ratio:
            raise ValueError(f"prediction_ratio must be in (0, mask_ratio={self.mask_ratio}], "
                             f"got {self.prediction_ratio}")
        length = self.num_patches
        n_pred = length - self.num_visible() - int(length * (self.mask_ratio - self.prediction_ratio))
        if n_pred < 1:
            raise ValueError(f"prediction_ratio={self.prediction_ratio} predicts no patch of {length}; "
                             "raise it")
        return n_pred

    def forward_decoder(self, feats: Sequence[torch.Tensor], predicted: torch.Tensor) -> torch.Tensor:
        """Reconstruct the predicted patches.

        Args:
            feats: k tensors (N, T, D): the chosen encoder feature maps, cls first.
            predicted: (N, L) bool, the same number of True per row.

        Returns:
            (N, P, p*p*C) predictions for the True positions, in natural patch order.
        """
        n = predicted.shape[0]
        pos = self.decoder_pos_embed[:, 1:].expand(n, -1, -1)[predicted]
        x = pos.reshape(n, -1, pos.shape[-1]) + self.mask_token
        for i, blk in enumerate(self.decoder_blocks):
            x = blk(x, self.dec_norms[i](self.wfm(feats, i)))
        return self.decoder_pred(self.decoder_norm(x))

    def forward(self, imgs: torch.Tensor, noise: torch.Tensor | None = None) -> MaskedOutput:
        """Mask, encode, reconstruct the predicted patches and score them.

        Args:
            imgs: (N, C, H, W).
            noise: optional (N, L). Patches sorted by ascending noise: the first `int(L*(1-mask_ratio))`
                are visible, the last `num_predicted()` are reconstructed, those between neither.
                Drawn uniformly when None.

        Returns:
            MaskedOutput; `pred` is 0 outside the predicted patches, `mask` marks them.
        """
        ids_shuffle, ids_restore = self.shuffle(imgs, noise)
        len_keep, n_pred = self.num_visible(), self.num_predicted()
        feats = self.forward_features(imgs, ids_shuffle[:, :len_keep])
        chosen = ([feats[0]] if self.use_input else []) + [feats[i + 1] for i in self.use_fm]
        visible = ids_restore < len_keep
        predicted = ids_restore >= self.num_patches - n_pred
        pred = self.forward_decoder(chosen, predicted)
        target = self.target(imgs)[predicted].reshape(pred.shape)
        loss = ((pred - target) ** 2).mean()
        full = pred.new_zeros(*predicted.shape, pred.shape[-1]).masked_scatter(predicted.unsqueeze(-1), pred)
        return MaskedOutput(loss, full, predicted.float(), visible)
