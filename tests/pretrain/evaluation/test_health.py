"""Feature health: the statistics that make inflated or collapsed features visible."""
import math

import pytest
import torch

from pretrain.evaluation.health import encoder_health, health_line, token_stats
from pretrain.models import MaskedViTEncoder


def test_token_stats_of_a_known_tensor():
    """Channel 0 constant at 10 (an inflated channel), channels 1 and 2 alternating around zero."""
    tokens = torch.tensor([[[10.0, 1.0, 2.0], [10.0, -1.0, -2.0], [10.0, 1.0, 2.0], [10.0, -1.0, -2.0]]])
    stats = token_stats(tokens)
    stds = [0.0, math.sqrt(4 / 3), 2 * math.sqrt(4 / 3)]  # sample std over the 4 tokens
    assert stats["max_channel_mean"] == pytest.approx(10.0)
    assert stats["median_channel_std"] == pytest.approx(stds[1])
    assert stats["dominance"] == pytest.approx(10.0 / stds[1])
    assert stats["token_norm"] == pytest.approx(math.sqrt(105)) and stats["token_norm_spread"] == pytest.approx(0.0)
    assert stats["std"] == pytest.approx(float(tokens.flatten().std()))
    assert "= 8.7 x the median channel std" in health_line(stats)


def test_encoder_health_reads_the_embedded_input_and_every_block():
    torch.manual_seed(0)
    encoder = MaskedViTEncoder(img_size=32, patch_size=8, embed_dim=16, depth=3, num_heads=2).eval()
    imgs = torch.randn(2, 3, 32, 32)
    health = encoder_health(encoder, imgs)
    assert [h["map"] for h in health] == [0, 1, 2, 3]
    embedded = encoder.patch_embed(imgs) + encoder.pos_embed[:, 1:]  # map 0: patch tokens, no cls
    assert health[0]["std"] == pytest.approx(token_stats(embedded)["std"], rel=1e-6)
    assert encoder_health(encoder, imgs, blocks=[3]) == [health[3]]
