"""Frozen encoder features (`pretrain.evaluation.features`): the chosen block's tokens, pooled."""
import pytest
import torch
import torch._dynamo

from pretrain.errors import ConfigError
from pretrain.evaluation.features import encoder_features, extract_features
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


class _Images(torch.utils.data.Dataset):
    """Five random 32 px images (labels unused): two full batches of 2 and a last batch of 1."""

    def __init__(self) -> None:
        self.images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], 0


@pytest.mark.slow  # inductor compiles the encoder for two batch sizes: tens of seconds on CPU
def test_compiled_features_equal_eager(tmp_path, tiny_checkpoint):
    """`compile=True` (`tools/probe.py --compile`) changes how the features are computed, not what they are."""
    model, _ = load_encoder(tiny_checkpoint(tmp_path / "m.pth"))
    eager = extract_features(model, _Images(), block=0, pool="mean", batch_size=2)
    try:
        compiled = extract_features(model, _Images(), block=0, pool="mean", batch_size=2, compile=True)
    finally:
        torch._dynamo.reset()
    assert compiled.shape == eager.shape == (5, 32)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
