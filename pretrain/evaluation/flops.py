"""Encoder / decoder FLOPs of a masked-autoencoder forward, counted with fvcore.

fvcore's convention: one fused multiply-add counts as one FLOP (as in the MAE, CrossMAE and
ViTDet papers' GFLOPs). fvcore 0.1.5 predates `aten::scaled_dot_product_attention`, so a handle
for it is registered here: `q @ k^T` and `attn @ v` are two batched matmuls.
"""
from __future__ import annotations

from typing import Any

import torch
from fvcore.nn import FlopCountAnalysis

ENCODER_MODULES = ("patch_embed", "blocks", "norm")


def _shape(value: Any) -> list[int]:
    return list(value.type().sizes())


def sdpa_flop_handle(inputs: list[Any], outputs: list[Any]) -> int:
    """FLOPs of scaled_dot_product_attention: (..., Lq, E) x (..., Lk, E) then (..., Lq, Lk) x (..., Lk, Ev)."""
    q, k, v = (_shape(x) for x in inputs[:3])
    batch = 1
    for d in q[:-2]:
        batch *= d
    lq, e, lk, ev = q[-2], q[-1], k[-2], v[-1]
    return batch * lq * lk * (e + ev)


def count_flops(model: torch.nn.Module, imgs: torch.Tensor, noise: torch.Tensor | None = None) -> dict[str, float]:
    """GFLOPs per image of one forward of an MAE/CrossMAE model, split into encoder and decoder.

    The encoder is `patch_embed`, `blocks` and `norm`; everything else the forward runs
    (decoder embedding, blocks, inter-block weighting, prediction head) counts as decoder.

    Args:
        model: an MAE or CrossMAE model.
        imgs: (N, 3, H, W) input batch.
        noise: optional (N, L) masking noise; fixes which patches are visible and predicted.

    Returns:
        {"encoder": GFLOPs, "decoder": GFLOPs, "total": GFLOPs}, each per image.
    """
    was_training = model.training
    model.eval()

    class _Wrapped(torch.nn.Module):  # fvcore traces a module returning tensors
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
            return self.inner(x, noise=n).loss

    if noise is None:
        noise = torch.rand(imgs.shape[0], model.patchify(imgs[:1]).shape[1], device=imgs.device)
    analysis = FlopCountAnalysis(_Wrapped(model), (imgs, noise))
    analysis.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_handle)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    by_module = analysis.by_module()
    total = analysis.total()
    encoder = sum(by_module.get(f"inner.{name}", 0) for name in ENCODER_MODULES)
    model.train(was_training)
    n = imgs.shape[0]
    return {"encoder": encoder / n / 1e9, "decoder": (total - encoder) / n / 1e9, "total": total / n / 1e9}
