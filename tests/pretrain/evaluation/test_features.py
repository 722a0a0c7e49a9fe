"""Frozen encoder features (`pretrain.evaluation.features`): the chosen block's tokens, pooled."""
import pytest
import torch

from pretrain.errors import ConfigError
from pretrain.evaluation.features import encoder_features
from pretrain.weights.loading import load_encoder


def test_features_are_the_chosen_block_pooled(tmp_path, tiny_checkpoint):
    model, _ = load_encoder(tiny_checkpoint(tmp_path / "m.pth"))
    imgs = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        maps = model.forward_features(imgs, torch.arange(16).expand(3, -1))
    spatial = encoder_features(model, imgs, block=0, pool="spatial")
    assert spatial.shape == (3, 16 * 32) and torch.equal(spatial, maps[1][:, 1:].flatten(1))
    assert torch.equal(encoder_features(model, imgs, pool="cls"), maps[-1][:, 0])
    torch.testing.assert_close(encoder_features(model, imgs, block=-1, pool="mean"), maps[2][:, 1:].mean(1))
    with pytest.raises(ConfigError, match="outside the encoder's 2 blocks"):
        encoder_features(model, imgs, block=2)
