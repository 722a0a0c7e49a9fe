"""FLOP counting (`pretrain.evaluation.flops`): fvcore's handle for scaled_dot_product_attention."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from fvcore.nn import FlopCountAnalysis

from pretrain.evaluation.flops import sdpa_flop_handle


def test_sdpa_flop_handle_counts_two_batched_matmuls_exactly():
    class Attend(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 4)
    analysis = FlopCountAnalysis(Attend(), (q, k, v))
    analysis.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_handle)
    # q k^T: 2*3 heads x 5 x 7 x 8 multiply-adds; attn v: 2*3 x 5 x 7 x 4
    assert analysis.total() == 2 * 3 * 5 * 7 * 8 + 2 * 3 * 5 * 7 * 4
