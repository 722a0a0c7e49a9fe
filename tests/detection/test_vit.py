"""ViTDet backbone adapter (`detection.vit`): shapes, attention paths, position embeddings, golden check, a frozen
backbone."""
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import detection  # noqa: F401  (makes detectron2 v0.6 importable)
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detection.layer_decay import get_optimizer_params
from detection.rel_pos import rel_pos_bias
from detection.vit import (Attention, LayerNorm, SimpleFeaturePyramid, ViT, get_abs_pos, get_norm, window_partition,
                           window_unpartition)

DATA = Path(__file__).resolve().parents[1] / "data"  # tests/data
TINY = dict(img_size=64, patch_size=16, embed_dim=16, depth=4, num_heads=2, mlp_ratio=2.0, use_rel_pos=True,
            window_size=2, window_block_indexes=(0, 2), norm_layer=partial(nn.LayerNorm, eps=1e-6))


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Move every parameter (incl. zero-initialised rel_pos tables) off its init so all paths matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.5 if "rel_pos" in name else 0.1
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def _pyramid(**kw) -> SimpleFeaturePyramid:
    net = ViT(**{**TINY, **kw})
    return SimpleFeaturePyramid(net, "last_feat", 8, (4.0, 2.0, 1.0, 0.5), top_block=LastLevelMaxPool(), norm="LN")


@pytest.mark.parametrize("hw", [(64, 64), (80, 80), (64, 96), (96, 48)])
def test_pyramid_shapes_strides_channels(hw):
    torch.manual_seed(0)
    model = _pyramid().eval()
    shapes = model.output_shape()
    assert list(shapes) == ["p2", "p3", "p4", "p5", "p6"]
    assert [s.stride for s in shapes.values()] == [4, 8, 16, 32, 64]
    assert all(s.channels == 8 for s in shapes.values())
    assert model.size_divisibility == 32 and model.padding_constraints["size_divisibility"] == 32
    x = torch.randn(1, 3, *hw)
    with torch.no_grad():
        feat = model.net(x)["last_feat"]
        out = model(x)
    assert feat.shape == (1, 16, hw[0] // 16, hw[1] // 16)  # 80 -> 5x5 map: window 2 needs padding
    assert torch.isfinite(feat).all()
    for name, s in shapes.items():
        h, w = hw[0] // 16, hw[1] // 16
        expected = {4: (h * 4, w * 4), 8: (h * 2, w * 2), 16: (h, w), 32: (h // 2, w // 2),
                    64: ((h // 2 - 1) // 2 + 1, (w // 2 - 1) // 2 + 1)}[s.stride]
        assert out[name].shape == (1, 8, *expected), name


def test_square_pad_pads_bottom_right_with_zeros_once():
    torch.manual_seed(0)
    net = _randomize(ViT(**TINY))
    model = SimpleFeaturePyramid(net, "last_feat", 8, (4.0, 2.0, 1.0, 0.5), LastLevelMaxPool(), square_pad=96).eval()
    seen = []
    model.net.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    x = torch.randn(1, 3, 64, 96)
    padded = torch.nn.functional.pad(x, (0, 0, 0, 32))
    with torch.no_grad():
        out, out_padded = model(x), model(padded)
    assert seen[0].shape == seen[1].shape == (1, 3, 96, 96)
    assert torch.equal(seen[0][:, :, :64], x) and not seen[0][:, :, 64:].any()  # image kept at the top left
    assert seen[1] is padded  # already square: passed on as it is
    for name in out:
        torch.testing.assert_close(out[name], out_padded[name])
    with torch.no_grad():  # a side over square_pad is left as it is
        model(torch.randn(1, 3, 128, 64))
    assert seen[2].shape == (1, 3, 128, 96)


@pytest.mark.parametrize("kw", [{}, dict(residual_block_indexes=(1,)), dict(use_act_checkpoint=True)])
@pytest.mark.parametrize("attn_impl", ["sdpa", "eager", "folded"])
def test_every_parameter_of_the_backbone_gets_a_gradient(kw, attn_impl):
    # rel_pos tables start at zero and the residual branch's last norm too: move them off, as training would
    torch.manual_seed(0)
    model = _randomize(_pyramid(attn_impl=attn_impl, **kw)).train()
    out = model(torch.randn(2, 3, 64, 96))
    sum(v.square().mean() for v in out.values()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"


def test_state_dict_keys_match_vitdet_layout():
    keys = set(_pyramid(residual_block_indexes=(1,)).state_dict())
    assert {"net.pos_embed", "net.patch_embed.proj.weight", "net.blocks.0.attn.rel_pos_h",
            "net.blocks.1.residual.norm3.weight", "net.blocks.3.mlp.fc2.bias"} <= keys
    # simfp_2: deconv, LN, GELU, deconv, conv1x1(+norm), conv3x3(+norm); simfp_3: deconv, 2 convs; ...
    assert {"simfp_2.0.weight", "simfp_2.1.weight", "simfp_2.3.weight", "simfp_2.4.norm.weight",
            "simfp_2.5.weight", "simfp_3.0.weight", "simfp_3.2.norm.bias", "simfp_4.0.weight",
            "simfp_4.1.norm.weight", "simfp_5.1.weight", "simfp_5.2.norm.weight"} <= keys
    assert "simfp_5.0.weight" not in keys and not any(k.startswith("net.norm.") for k in keys)
    assert _pyramid().net.pos_embed.shape == (1, 14 * 14 + 1, 16)  # 224 / 16 grid with the cls slot


def test_window_partition_roundtrip_with_padding():
    x = torch.randn(2, 5, 7, 3)
    windows, pad_hw = window_partition(x, 3)
    assert pad_hw == (6, 9) and windows.shape == (2 * 2 * 3, 3, 3, 3)
    assert torch.equal(windows[0, :, :, 0], x[0, :3, :3, 0])
    assert torch.equal(windows[5, 2], torch.zeros(3, 3))  # last window row lies in the padding
    assert torch.equal(window_unpartition(windows, 3, pad_hw, (5, 7)), x)


def test_one_window_covering_the_map_equals_global_attention():
    torch.manual_seed(0)
    glob = _randomize(ViT(**{**TINY, "window_size": 0, "window_block_indexes": ()}))
    windowed = ViT(**{**TINY, "window_size": 4, "window_block_indexes": (0, 1, 2, 3)}).eval()
    windowed.load_state_dict(glob.state_dict())  # same rel_pos sizes: img 64 / patch 16 = window 4
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(windowed(x)["last_feat"], glob(x)["last_feat"], atol=1e-5)
        # control: windows smaller than the map do change the result (rel pos off so only windowing differs)
        plain = _randomize(ViT(**{**TINY, "use_rel_pos": False, "window_block_indexes": ()}))
        small = ViT(**{**TINY, "use_rel_pos": False, "window_size": 2, "window_block_indexes": (0, 1, 2, 3)})
        small.load_state_dict(plain.state_dict())
        assert not torch.allclose(small.eval()(x)["last_feat"], plain(x)["last_feat"], atol=1e-3)


@pytest.mark.parametrize("hw", [(4, 4), (3, 5)])
def test_sdpa_bias_equals_explicit_softmax(hw):
    torch.manual_seed(0)
    sdpa = _randomize(Attention(16, num_heads=2, use_rel_pos=True, input_size=(4, 4), attn_impl="sdpa"))
    eager = Attention(16, num_heads=2, use_rel_pos=True, input_size=(4, 4), attn_impl="eager")
    eager.load_state_dict(sdpa.state_dict())
    x = torch.randn(2, *hw, 16)
    with torch.no_grad():
        out = sdpa(x)
        assert torch.allclose(out, eager(x), atol=1e-5)
        sdpa.rel_pos_h.zero_()  # the bias really enters: dropping it changes the output
        assert not torch.allclose(out, sdpa(x), atol=1e-3)


@pytest.mark.parametrize("hw, table", [((4, 4), (4, 4)), ((3, 5), (4, 4)), ((6, 2), (3, 3))])
def test_folded_relative_position_equals_the_explicit_softmax_with_gradients(hw, table):
    """The folded path (no N x N bias) gives detectron2's explicit attention: outputs and every gradient, on square
    and oblong grids, and with tables resized to another grid."""
    torch.manual_seed(0)
    folded = _randomize(Attention(16, num_heads=2, use_rel_pos=True, input_size=table, attn_impl="folded"))
    eager = Attention(16, num_heads=2, use_rel_pos=True, input_size=table, attn_impl="eager")
    eager.load_state_dict(folded.state_dict())
    x = torch.randn(2, *hw, 16, requires_grad=True)
    out = folded(x)
    want = eager(x)
    assert torch.allclose(out, want, atol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), [x, *folded.parameters()])
    wants = torch.autograd.grad(want.square().sum(), [x, *eager.parameters()])
    for (name, _), got, expected in zip([("x", x), *folded.named_parameters()], grads, wants):
        assert torch.allclose(got, expected, atol=1e-4), name
    assert grads[[n for n, _ in folded.named_parameters()].index("rel_pos_h") + 1].abs().sum() > 0


def test_folded_backbone_matches_official_vitdet_golden():
    ref = torch.load(DATA / "vitdet_reference.pt", weights_only=True)
    net = ViT(**ref["config"], norm_layer=partial(nn.LayerNorm, eps=ref["norm_eps"]), attn_impl="folded")
    model = SimpleFeaturePyramid(net, "last_feat", ref["out_channels"], tuple(ref["scale_factors"]),
                                 top_block=LastLevelMaxPool(), norm="LN").eval()
    model.load_state_dict(ref["state_dict"], strict=True)
    with torch.no_grad():
        out = model(ref["input"])
    for name, want in ref["outputs"].items():
        assert torch.allclose(out[name], want, atol=1e-5, rtol=1e-5), name


def test_rel_pos_bias_matches_per_pair_definition():
    torch.manual_seed(0)
    q, rh, rw = torch.randn(1, 6, 4), torch.randn(3, 4), torch.randn(5, 4)  # 2x3 grid, tables 2*2-1, 2*3-1
    bias = rel_pos_bias(q, rh, rw, (2, 3), (2, 3))[0]
    for i in range(6):
        for j in range(6):
            (qy, qx), (ky, kx) = divmod(i, 3), divmod(j, 3)
            want = q[0, i] @ rh[qy - ky + 1] + q[0, i] @ rw[qx - kx + 2]
            assert torch.isclose(bias[i, j], want, atol=1e-6)


def test_get_abs_pos_identity_at_pretrain_size_and_resized_elsewhere():
    pos = torch.randn(1, 1 + 14 * 14, 8)
    same = get_abs_pos(pos, True, (14, 14))
    assert torch.equal(same, pos[:, 1:].reshape(1, 14, 14, 8))
    resized = get_abs_pos(pos, True, (5, 9))
    assert resized.shape == (1, 5, 9, 8)
    assert get_abs_pos(pos[:, 1:], False, (5, 9)).equal(resized)  # the cls slot is dropped, not resized
    with pytest.raises(ValueError, match="square grid"):
        get_abs_pos(pos, False, (14, 14))


def test_channels_first_layernorm():
    norm = get_norm("LN", 6)
    assert isinstance(norm, LayerNorm) and norm.eps == 1e-6
    assert [n for n, _ in norm.named_parameters()] == ["weight", "bias"]
    with torch.no_grad():
        norm.weight.uniform_(), norm.bias.uniform_()
    x = torch.randn(2, 6, 3, 4) * 3 + 1
    u, var = x.mean(1, keepdim=True), x.var(1, unbiased=False, keepdim=True)
    want = norm.weight[:, None, None] * (x - u) / torch.sqrt(var + 1e-6) + norm.bias[:, None, None]
    assert torch.allclose(norm(x), want, atol=1e-5)
    assert isinstance(get_norm("GN", 32), nn.GroupNorm) and get_norm("", 8) is None


def test_act_checkpoint_gives_same_output_and_grads():
    torch.manual_seed(0)
    plain = _randomize(ViT(**TINY)).train()
    ckpt = ViT(**TINY, use_act_checkpoint=True).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 48, 64)
    plain(x)["last_feat"].square().sum().backward()
    ckpt(x)["last_feat"].square().sum().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5), name


def test_matches_official_vitdet_golden():
    ref = torch.load(DATA / "vitdet_reference.pt", weights_only=True)
    net = ViT(**ref["config"], norm_layer=partial(nn.LayerNorm, eps=ref["norm_eps"]))
    model = SimpleFeaturePyramid(net, "last_feat", ref["out_channels"], tuple(ref["scale_factors"]),
                                 top_block=LastLevelMaxPool(), norm="LN").eval()
    assert set(model.state_dict()) == set(ref["state_dict"])
    model.load_state_dict(ref["state_dict"], strict=True)
    with torch.no_grad():
        out = model(ref["input"])
    assert list(out) == ["p2", "p3", "p4", "p5", "p6"]
    for name, want in ref["outputs"].items():
        assert torch.allclose(out[name], want, atol=1e-5, rtol=1e-5), name


def test_a_frozen_backbone_learns_nothing_and_stays_in_eval_mode():
    torch.manual_seed(0)
    model = _pyramid(freeze=True, drop_path_rate=0.5).train()
    assert not model.net.training and model.training and all(not b.training for b in model.net.blocks)
    out = model(torch.randn(2, 3, 64, 64))
    sum(v.square().mean() for v in out.values()).backward()
    assert all(p.grad is None and not p.requires_grad for p in model.net.parameters())
    assert all(p.grad is not None for n, p in model.named_parameters() if not n.startswith("net."))
    params = {id(p) for g in get_optimizer_params(model, base_lr=1e-4, weight_decay=0.1) for p in g["params"]}
    assert not params & {id(p) for p in model.net.parameters()}  # the optimizer never sees the ViT
    with torch.no_grad():  # eval mode: drop path off, so two passes agree
        torch.testing.assert_close(model.net(torch.ones(1, 3, 64, 64))["last_feat"],
                                   model.net(torch.ones(1, 3, 64, 64))["last_feat"])
