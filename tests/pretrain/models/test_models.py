"""MAE / CrossMAE models: masking, decoder independence, loss support, registry, checkpoint keys."""
from functools import partial

import pytest
import torch

from pretrain.models import MAE, CrossMAE, build_model, list_models, model_info, register_model

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
            decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=2)
L = 16  # (32 / 8) ** 2


def noise_from_order(order: list[int]) -> torch.Tensor:
    """(1, L) noise whose ascending argsort is `order`."""
    noise = torch.empty(1, len(order))
    noise[0, order] = torch.arange(len(order), dtype=torch.float32) / len(order)
    return noise


def _tiny(cls, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return cls(**{**TINY, **kw}).eval()


@pytest.mark.parametrize("cls,kw,n_keep,n_loss", [
    (MAE, dict(), 4, 12),
    (CrossMAE, dict(prediction_ratio=0.75), 4, 12),
    (CrossMAE, dict(prediction_ratio=0.25), 4, 4),
    (CrossMAE, dict(img_size=40, prediction_ratio=0.25), 6, 7),  # 25 patches: official rounding
])
def test_masking_follows_noise_order(cls, kw, n_keep, n_loss):
    model = _tiny(cls, **kw)
    length = model.num_patches
    torch.manual_seed(1)
    imgs = torch.randn(3, 3, model.patch_embed.img_size[0], model.patch_embed.img_size[1])
    noise = torch.rand(3, length)
    out = model(imgs, noise=noise)
    order = noise.argsort(dim=1)
    for i in range(3):
        visible = set(torch.nonzero(out.visible[i]).flatten().tolist())
        in_loss = set(torch.nonzero(out.mask[i]).flatten().tolist())
        assert visible == set(order[i, :n_keep].tolist())  # smallest noise is seen
        assert in_loss == set(order[i, length - n_loss:].tolist())  # largest noise is predicted
        assert not visible & in_loss
    assert out.mask.dtype == torch.float32 and out.visible.dtype == torch.bool
    again = model(imgs, noise=noise.clone())
    assert torch.equal(again.loss, out.loss) and torch.equal(again.mask, out.mask)


def test_mae_masks_every_hidden_patch():
    model = _tiny(MAE)
    out = model(torch.randn(2, 3, 32, 32), noise=torch.rand(2, L))
    assert torch.equal(out.mask.bool(), ~out.visible)
    assert model.prediction_ratio == model.mask_ratio


@pytest.mark.parametrize("self_attn", [False, True])
def test_crossmae_query_depends_on_other_queries_only_with_self_attention(self_attn):
    model = _tiny(CrossMAE, prediction_ratio=0.25, decoder_self_attn=self_attn)
    imgs = torch.randn(1, 3, 32, 32)
    # same visible patches 0-3 in the same order; predicted sets {12..15} and {10..13} share 12, 13
    a = model(imgs, noise=noise_from_order(list(range(16))))
    b = model(imgs, noise=noise_from_order([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 14, 15, 10, 11, 12, 13]))
    assert torch.nonzero(a.mask[0]).flatten().tolist() == [12, 13, 14, 15]
    assert torch.nonzero(b.mask[0]).flatten().tolist() == [10, 11, 12, 13]
    shared_a, shared_b = a.pred[0, 12:14], b.pred[0, 12:14]
    if self_attn:
        assert (shared_a - shared_b).abs().max() > 1e-4
    else:
        torch.testing.assert_close(shared_a, shared_b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("cls", [MAE, CrossMAE])
@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_is_mse_over_loss_patches_only(cls, norm_pix):
    model = _tiny(cls, norm_pix_loss=norm_pix, **({"prediction_ratio": 0.25} if cls is CrossMAE else {}))
    imgs = torch.randn(2, 3, 32, 32)
    out = model(imgs, noise=torch.rand(2, L))
    target = model.patchify(imgs)
    if norm_pix:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    sel = out.mask.bool()
    expected = ((out.pred[sel] - target[sel]) ** 2).mean()
    torch.testing.assert_close(out.loss, expected)
    if cls is CrossMAE:
        assert torch.all(out.pred[~sel] == 0)


def test_crossmae_loss_ignores_pixels_of_patches_neither_seen_nor_predicted():
    model = _tiny(CrossMAE, prediction_ratio=0.25)
    imgs = torch.randn(1, 3, 32, 32)
    noise = noise_from_order(list(range(16)))  # visible 0-3, skipped 4-11, predicted 12-15
    base = model(imgs, noise=noise).loss

    def perturbed(patch: int) -> torch.Tensor:
        x = imgs.clone()
        r, c = divmod(patch, 4)
        x[:, :, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] += torch.randn(1, 3, 8, 8)
        return model(x, noise=noise).loss

    torch.testing.assert_close(perturbed(7), base, rtol=0, atol=1e-7)
    assert (perturbed(13) - base).abs() > 1e-4


@pytest.mark.parametrize("name", list_models())
def test_registered_model_trains_every_parameter(name):
    torch.manual_seed(0)
    model = build_model(name, **TINY)
    model.train()
    out = model(torch.randn(2, 3, 32, 32))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert out.pred.shape == (2, L, 8 * 8 * 3) and out.mask.shape == out.visible.shape == (2, L)
    out.loss.backward()
    for n, p in model.named_parameters():
        if n in ("pos_embed", "decoder_pos_embed"):
            assert not p.requires_grad and p.grad is None, n
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{n} got no gradient"


def test_builders_use_paper_defaults():
    cross = build_model("crossmae_vit_tiny_patch16")
    mae = build_model("mae_vit_tiny_patch16")
    assert (cross.mask_ratio, cross.prediction_ratio) == (0.75, 0.75)
    assert cross.norm_pix_loss and cross.use_input and cross.norm is None
    assert (mae.mask_ratio, mae.norm_pix_loss) == (0.75, True)
    assert len(cross.decoder_blocks) == 12 and len(mae.decoder_blocks) == 8
    assert cross.pos_embed.shape == (1, 197, 192) and len(cross.blocks) == 12
    assert build_model("crossmae_vit_tiny_patch16", prediction_ratio=0.25, img_size=32).num_predicted() == 1


def _block_keys(prefix: str, layers: tuple[str, ...]) -> set[str]:
    return {f"{prefix}.{layer}.{p}" for layer in layers for p in ("weight", "bias")}


VIT_BLOCK = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
CROSS_BLOCK = ("norm1", "cross_attn.q", "cross_attn.kv", "cross_attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
HEAD = {"decoder_norm.weight", "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias",
        "mask_token", "decoder_pos_embed", "cls_token", "pos_embed", "patch_embed.proj.weight",
        "patch_embed.proj.bias"}


def test_mae_base_state_dict_keys_match_official():
    # official models_mae.py: timm blocks, encoder `norm`, decoder_embed, 8 decoder blocks
    expected = set(HEAD) | {"norm.weight", "norm.bias", "decoder_embed.weight", "decoder_embed.bias"}
    for i in range(12):
        expected |= _block_keys(f"blocks.{i}", VIT_BLOCK)
    for i in range(8):
        expected |= _block_keys(f"decoder_blocks.{i}", VIT_BLOCK)
    model = build_model("mae_vit_base_patch16")
    sd = model.state_dict()
    assert set(sd) == expected and len(sd) == 254
    assert sd["pos_embed"].shape == (1, 197, 768) and sd["decoder_pos_embed"].shape == (1, 197, 512)
    assert sd["decoder_embed.weight"].shape == (512, 768) and sd["decoder_pred.weight"].shape == (768, 512)
    assert model.decoder_blocks[0].attn.num_heads == 16
    assert isinstance(model.pos_embed, torch.nn.Parameter) and not model.pos_embed.requires_grad
    assert not list(model.buffers())


def test_crossmae_base_state_dict_keys_match_official():
    # official models_cross.py with --weight_fm --use_input: no encoder norm, no decoder_embed,
    # dec_norms and wfm over 12 blocks + input, 12 cross-attention decoder blocks
    expected = set(HEAD) | {"wfm.linear.weight"}
    for i in range(12):
        expected |= _block_keys(f"blocks.{i}", VIT_BLOCK)
        expected |= _block_keys(f"decoder_blocks.{i}", CROSS_BLOCK)
        expected |= {f"dec_norms.{i}.weight", f"dec_norms.{i}.bias"}
    model = build_model("crossmae_vit_base_patch16")
    sd = model.state_dict()
    assert set(sd) == expected and len(sd) == 347
    assert sd["wfm.linear.weight"].shape == (12, 13)
    assert sd["decoder_blocks.0.cross_attn.kv.weight"].shape == (1024, 768)
    assert sd["decoder_blocks.0.cross_attn.q.weight"].shape == (512, 512)
    assert model.decoder_blocks[0].cross_attn.num_heads == 16
    assert not list(model.buffers())


def test_crossmae_self_attention_option_uses_official_names():
    sd = _tiny(CrossMAE, decoder_self_attn=True).state_dict()
    assert _block_keys("decoder_blocks.1", ("norm0", "self_attn.qkv", "self_attn.proj")) <= set(sd)
    assert "decoder_blocks.0.norm0.weight" not in _tiny(CrossMAE).state_dict()


def test_crossmae_feature_maps_selection():
    model = _tiny(CrossMAE, use_input=False, use_fm=[-1])
    assert model.use_fm == [1] and model.wfm.linear.weight.shape == (2, 1)
    model(torch.randn(1, 3, 32, 32)).loss.backward()
    with pytest.raises(ValueError):
        _tiny(CrossMAE, use_fm=[2])


def _stacked_decoder(model: CrossMAE, feats: list[torch.Tensor], predicted: torch.Tensor) -> torch.Tensor:
    """`forward_decoder` as the official code and this project before issue 28 wrote it: every feature map stacked
    into one (N, T, D, k) tensor, mixed by `wfm.linear`, block i reading mix i."""
    n = predicted.shape[0]
    pos = model.decoder_pos_embed[:, 1:].expand(n, -1, -1)[predicted]
    x = pos.reshape(n, -1, pos.shape[-1]) + model.mask_token
    y = model.wfm.linear(torch.stack(feats, dim=-1))
    for i, blk in enumerate(model.decoder_blocks):
        x = blk(x, model.dec_norms[i](y[..., i]))
    return model.decoder_pred(model.decoder_norm(x))


def _decoder_inputs(model: CrossMAE) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Three (2, 33, 32) feature maps of the model's dtype that need gradients (more tokens than the 16 patches, so
    that the maps outweigh the decoder's own activations), and 4 predicted patches a row."""
    torch.manual_seed(2)
    dtype = model.mask_token.dtype
    feats = [torch.randn(2, 33, 32, dtype=dtype, requires_grad=True) for _ in range(3)]
    predicted = torch.zeros(2, L, dtype=torch.bool)
    predicted[0, [1, 4, 9, 15]] = predicted[1, [0, 2, 3, 7]] = True
    return feats, predicted


def _decoder_grads(model: CrossMAE, decoder, feats: list[torch.Tensor], predicted: torch.Tensor):
    """`decoder`'s output and the gradients of a squared loss on it, per parameter name and per feature map."""
    model.zero_grad(set_to_none=True)
    for f in feats:
        f.grad = None
    out = decoder(feats, predicted)
    out.square().sum().backward()
    return out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, [f.grad for f in feats]


# float32: the weighted sum rounds in another order than the stacked matrix product (gradients of about 10 differ
# by about 1e-5); float64: the two are the same function
@pytest.mark.parametrize("dtype, out_tol, grad_tol", [(torch.float32, 1e-6, 1e-5), (torch.float64, 1e-12, 1e-12)])
def test_crossmae_feature_weighting_equals_the_stacked_form_with_gradients(dtype, out_tol, grad_tol):
    """The decoder mixes the feature maps without stacking them (issue 28) and computes what the stacked form did."""
    model = _tiny(CrossMAE, use_fm=[0, 1]).train().to(dtype)
    with torch.no_grad():
        model.wfm.linear.weight.normal_()  # every map weighs in every block
    feats, predicted = _decoder_inputs(model)
    out, grads, feat_grads = _decoder_grads(model, model.forward_decoder, feats, predicted)
    ref, ref_grads, ref_feat_grads = _decoder_grads(model, partial(_stacked_decoder, model), feats, predicted)
    torch.testing.assert_close(out, ref, rtol=0, atol=out_tol)
    assert "wfm.linear.weight" in grads and grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=grad_tol, atol=grad_tol,
                                   msg=lambda m: f"{name}: {m}")
    for got, want in zip(feat_grads, ref_feat_grads):
        torch.testing.assert_close(got, want, rtol=grad_tol, atol=grad_tol)


def test_crossmae_decoder_keeps_no_stacked_copy_of_the_feature_maps():
    """What the decoder saves for its backward pass (its weights aside) holds no tensor as large as the k feature maps
    together."""
    model = _tiny(CrossMAE, use_fm=[0, 1]).train()
    feats, predicted = _decoder_inputs(model)
    weights, sizes = {p.untyped_storage().data_ptr() for p in model.parameters()}, []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in weights:  # a weight or a view of one (a transposed matrix)
            sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.forward_decoder(feats, predicted)
    assert sizes and max(sizes) < len(feats) * feats[0].numel()


def test_patchify_is_official_order_and_inverts():
    model = _tiny(MAE)
    imgs = torch.arange(3.0).view(1, 3, 1, 1).expand(1, 3, 32, 32)
    x = model.patchify(imgs)
    assert x.shape == (1, L, 192)
    assert x[0, 0, :6].tolist() == [0.0, 1.0, 2.0, 0.0, 1.0, 2.0]  # (p, p, C): channel fastest
    imgs = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.unpatchify(model.patchify(imgs)), imgs)


def test_bad_ratios_and_noise_are_refused():
    model = _tiny(CrossMAE)
    model.prediction_ratio = 0.8
    with pytest.raises(ValueError, match="prediction_ratio"):
        model(torch.randn(1, 3, 32, 32))
    model.prediction_ratio = 0.5
    with pytest.raises(ValueError, match="noise"):
        model(torch.randn(1, 3, 32, 32), noise=torch.rand(1, 15))
    mae = _tiny(MAE)
    with pytest.raises(ValueError, match="mask_ratio"):
        mae.prediction_ratio = 0.5


def test_registry_refuses_duplicates_and_unknown_names():
    expected = {f"{kind}_vit_{size}_patch16" for kind in ("mae", "crossmae")
                for size in ("tiny", "small", "base", "large")}
    expected |= {"mae_vit_huge_patch14", "crossmae_vit_huge_patch14"}
    assert set(list_models()) == expected
    with pytest.raises(ValueError, match="already registered"):
        register_model("mae_vit_base_patch16", "mae", "base")(lambda **kw: None)
    with pytest.raises(ValueError, match="family"):
        register_model("vit_other", "dino", "base")
    assert isinstance(build_model("mae_vit_base_patch16", **TINY), MAE)
    with pytest.raises(ValueError, match="crossmae_vit_base_patch16"):
        build_model("mae_vit_gigantic_patch16")
    assert build_model("crossmae_vit_small_patch16", **TINY, mask_ratio=0.5).mask_ratio == 0.5


@pytest.mark.parametrize("name", list_models())
def test_registry_metadata_describes_what_the_builder_builds(name):
    info = model_info(name)
    model = build_model(name, depth=1, decoder_depth=1)  # one block each: the widths are what is checked
    assert isinstance(model, {"mae": MAE, "crossmae": CrossMAE}[info.family])
    assert model.patch_embed.proj.weight.shape[0] == {"tiny": 192, "small": 384, "base": 768, "large": 1024,
                                                       "huge": 1280}[info.size]
    assert model.patch_embed.patch_size[0] == info.patch_size
    assert name in list_models(info.family, info.size)
