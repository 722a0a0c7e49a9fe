"""What a weights file holds and how it becomes a model (`pretrain.weights.loading`): a released checkpoint's
architecture inferred from its tensors, a width of no registered size refused, an exported encoder."""
import pytest
import torch

from pretrain.errors import CheckpointError
from pretrain.evaluation.features import encoder_features
from pretrain.models import CrossMAE, build_model
from pretrain.weights.loading import export_encoder, load_encoder, load_pretrain_model

L = 16  # (32 / 8) ** 2 patches
RELEASED = dict(img_size=32, patch_size=8, embed_dim=192, depth=1, decoder_embed_dim=64, decoder_num_heads=2,
                decoder_depth=1)  # ViT-Ti width, 32-wide decoder heads as every released decoder


@pytest.mark.parametrize("name, kw", [
    ("mae_vit_tiny_patch16", {}),
    ("crossmae_vit_tiny_patch16", dict(use_input=False, decoder_self_attn=True)),
    ("crossmae_vit_tiny_patch16", dict(use_input=True)),
])
def test_released_checkpoint_architecture_is_inferred(tmp_path, name, kw):
    torch.manual_seed(0)
    original = build_model(name, **RELEASED, **kw).eval()
    path = tmp_path / "released.pth"
    torch.save({"model": original.state_dict()}, path)  # no config, as the official checkpoints
    model, info = load_pretrain_model(path)
    assert info["source"] == "inferred" and info["name"] == name
    decoder_attn = model.decoder_blocks[0].cross_attn if isinstance(model, CrossMAE) else model.decoder_blocks[0].attn
    assert decoder_attn.num_heads == 2 and model.blocks[0].attn.num_heads == 3  # 64 / 32 per head; ViT-Ti's 3
    if "use_input" in kw:
        assert model.use_input == kw["use_input"]
    if "decoder_self_attn" in kw:
        assert (model.decoder_blocks[0].self_attn is not None) == kw["decoder_self_attn"]
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, L)
    with torch.no_grad():  # same heads, widths and flags: the same function, not just the same keys
        torch.testing.assert_close(model(imgs, noise=noise).pred, original(imgs, noise=noise).pred)


def test_unknown_width_needs_model_flag(tmp_path, tiny_model):
    path = tmp_path / "odd.pth"
    torch.save({"model": tiny_model("mae_vit_tiny_patch16").state_dict()}, path)  # width 32: no registered size
    with pytest.raises(CheckpointError, match="pass --model NAME") as e:
        load_pretrain_model(path)
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="is not a mae model"):
        load_pretrain_model(path, model_name="crossmae_vit_tiny_patch16")


def test_an_exported_encoder_gives_the_features_of_its_model(tmp_path, tiny_checkpoint):
    src = tiny_checkpoint(tmp_path / "m.pth")
    export_encoder(src, tmp_path / "enc.pth")
    full, info_full = load_encoder(src)
    enc, info = load_encoder(tmp_path / "enc.pth")
    assert info["family"] is None and info_full["family"] == "mae" and info["epoch"] == 3
    imgs = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(encoder_features(enc, imgs), encoder_features(full, imgs))
