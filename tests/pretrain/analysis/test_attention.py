"""Decoder attention analysis (`pretrain.analysis.attention`): recomputed attention probabilities, token groups,
the mask-token attention mass (Table 6's statistic) and CrossMAE's feature weights, each against an explicit
computation."""
import pytest
import torch
from timm.models.vision_transformer import Block

from pretrain.analysis.attention import (CLS, MASK, VISIBLE, AttentionMass, attention_mass_rows, attention_output,
                                         attention_probabilities, decoder_token_groups, feature_weights,
                                         mae_attention_mass)

L = 16  # (32 / 8) ** 2 patches of conftest's tiny_model; 4 visible at mask ratio 0.75


def explicit_softmax_attention(block: Block, x: torch.Tensor) -> torch.Tensor:
    """(N, T, C) block input -> (N, H, T, T), written out head by head from the qkv weights."""
    attn = block.attn
    xn = block.norm1(x)
    c, h = xn.shape[-1], attn.num_heads
    d = c // h
    w, b = attn.qkv.weight, attn.qkv.bias
    q, k = xn @ w[:c].T + b[:c], xn @ w[c:2 * c].T + b[c:2 * c]
    heads = []
    for i in range(h):
        scores = q[..., i * d:(i + 1) * d] @ k[..., i * d:(i + 1) * d].transpose(-1, -2) / d ** 0.5
        e = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
        heads.append(e / e.sum(dim=-1, keepdim=True))
    return torch.stack(heads, dim=1)


def test_recomputed_probabilities_reproduce_the_fused_attention():
    torch.manual_seed(0)
    block = Block(16, 4, qkv_bias=True)
    block.attn.fused_attn = True  # the SDPA path, which returns no probabilities
    torch.nn.init.normal_(block.attn.qkv.bias)
    x = torch.randn(2, 5, 16)
    xn = block.norm1(x)
    probs, v = attention_probabilities(block.attn, xn)
    assert probs.shape == (2, 4, 5, 5)
    torch.testing.assert_close(probs, explicit_softmax_attention(block, x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attention_output(block.attn, probs, v, xn), block.attn(xn), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 5))


def test_token_groups_follow_the_noise():
    noise = torch.tensor([[0.9, 0.1, 0.5, 0.3]])  # shuffled order 1, 3, 2, 0
    _, ids_restore = torch.argsort(noise, 1), torch.argsort(torch.argsort(noise, 1), 1)
    assert decoder_token_groups(ids_restore, 2).tolist() == [[CLS, MASK, VISIBLE, MASK, VISIBLE]]


def test_mae_attention_mass_matches_an_explicit_computation(tiny_model):
    model = tiny_model("mae_vit_tiny_patch16")
    torch.manual_seed(1)
    imgs, noise = torch.randn(3, 3, 32, 32), torch.rand(3, L)
    sums, count = mae_attention_mass(model, imgs, noise, verify=True)

    inputs = []  # what enters each decoder block, captured by the test itself
    handles = [b.register_forward_pre_hook(lambda m, a: inputs.append(a[0])) for b in model.decoder_blocks]
    with torch.no_grad():
        visible = model(imgs, noise=noise).visible  # (N, L), from the model, not from the analysis code
        expected = []
        for block, x in zip(model.decoder_blocks, inputs):
            p = explicit_softmax_attention(block, x)  # (N, H, 1 + L, 1 + L); token 0 is cls
            on_visible, on_mask = [], []
            for n in range(3):
                keys_visible = torch.cat([torch.tensor([True]), visible[n]])
                for t in torch.nonzero(~visible[n]).flatten() + 1:
                    on_visible.append(p[n, :, t, keys_visible].sum(-1))
                    on_mask.append(p[n, :, t, ~keys_visible].sum(-1))
            expected.append([torch.cat(on_visible).mean(), torch.cat(on_mask).mean()])
    for h in handles:
        h.remove()
    means = sums / count
    assert count == 3 * 2 * 12  # images x heads x mask queries
    got = torch.stack([means[:, CLS] + means[:, VISIBLE], means[:, MASK]], dim=1)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(means.sum(1), torch.ones(2, dtype=torch.float64))
    assert not torch.allclose(got[:, 0], torch.tensor(5 / 17, dtype=torch.float64))  # not uniform attention


def test_table6_statistic_is_the_per_key_attention_summed_over_heads(tiny_model):
    """Table 6's reading: per block, a mask query's attention on one key of a group, averaged over the queries
    (and images) and the group's keys, summed over heads; then summed over blocks. Written out here key by key."""
    model = tiny_model("mae_vit_tiny_patch16")
    torch.manual_seed(3)
    imgs, noise = torch.randn(3, 3, 32, 32), torch.rand(3, L)
    totals = AttentionMass(2)
    totals.add(*mae_attention_mass(model, imgs, noise), images=3)
    rows = attention_mass_rows(totals.means(), num_heads=2, len_keep=4, num_patches=L)

    inputs = []
    handles = [b.register_forward_pre_hook(lambda m, a: inputs.append(a[0])) for b in model.decoder_blocks]
    with torch.no_grad():
        visible = model(imgs, noise=noise).visible
        expected = []
        for block, x in zip(model.decoder_blocks, inputs):
            p = explicit_softmax_attention(block, x)
            block_total = torch.zeros(2, dtype=torch.float64)
            for h in range(2):
                per_visible_key, per_mask_key = [], []
                for n in range(3):
                    keys_visible = torch.cat([torch.tensor([True]), visible[n]])  # cls + 4 visible patches
                    assert int(keys_visible.sum()) == 5
                    for t in torch.nonzero(~visible[n]).flatten() + 1:
                        per_visible_key.append(p[n, h, t, keys_visible].mean())
                        per_mask_key.append(p[n, h, t, ~keys_visible].mean())  # the 12 mask tokens
                block_total += torch.stack([torch.stack(per_visible_key).mean(),
                                            torch.stack(per_mask_key).mean()]).double()
            expected.append(block_total)
    for h in handles:
        h.remove()
    got = torch.tensor([[r["visible"], r["mask"]] for r in rows[:2]], dtype=torch.float64)
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-5, atol=1e-7)
    assert rows[2]["visible"] == pytest.approx(float(got[:, 0].sum()))
    assert rows[2]["mask"] == pytest.approx(float(got[:, 1].sum()))
    # the per-query mass is kept beside it: 5 visible keys x per-key / heads
    for r in rows[:2]:
        assert r["visible_mass"] == pytest.approx(r["visible"] * 5 / 2, rel=1e-6)
        assert r["visible_mass"] + r["mask_mass"] == pytest.approx(1.0)


def test_uniform_attention_gives_token_shares(tiny_model):
    # zero q and k: every query spreads its attention evenly over cls + 16 patches
    model = tiny_model("mae_vit_tiny_patch16")
    for block in model.decoder_blocks:
        torch.nn.init.zeros_(block.attn.qkv.weight)
        torch.nn.init.zeros_(block.attn.qkv.bias)
    sums, count = mae_attention_mass(model, torch.randn(2, 3, 32, 32), torch.rand(2, L), verify=True)
    rows = attention_mass_rows(sums / count, num_heads=2, len_keep=4, num_patches=L)
    for row in rows[:2]:
        assert row["cls_mass"] == pytest.approx(1 / 17)
        assert row["visible_mass"] == pytest.approx(5 / 17) and row["mask_mass"] == pytest.approx(12 / 17)
        # per key, every key gets 1 / 17 of each of the 2 heads: no preference, whatever the group sizes
        assert row["visible"] == pytest.approx(2 / 17) and row["mask"] == pytest.approx(2 / 17)
    assert rows[-1]["block"] == "sum" and rows[-1]["visible_mass"] == pytest.approx(10 / 17)
    assert rows[-1]["visible"] == pytest.approx(4 / 17)


def test_table6_reading_fits_the_papers_vit_b_figures():
    """ViT-B/16 at mask ratio 0.75: 50 visible keys (cls + 49), 147 mask keys, 16 heads, 8 blocks. Per key, a
    query's attention summed over keys and heads is 16 per block, so the paper's totals must give 8 * 16."""
    means = torch.tensor([[0.0, 0.5, 0.5]] * 8, dtype=torch.float64)  # any masses summing to 1 per block
    total = attention_mass_rows(means, num_heads=16, len_keep=49, num_patches=196)[-1]
    assert 50 * total["visible"] + 147 * total["mask"] == pytest.approx(8 * 16)
    assert 50 * 1.42 + 147 * 0.39 == pytest.approx(8 * 16, abs=0.5)  # Table 6's 1.42 / 0.39 fit this reading


def test_verify_catches_a_recomputation_that_differs_from_the_block(tiny_model):
    model = tiny_model("mae_vit_tiny_patch16")
    model.decoder_blocks[1].attn.fused_attn = True
    model.decoder_blocks[1].attn.scale = 1.0  # SDPA ignores it; the recomputation would not
    with pytest.raises(RuntimeError, match="decoder block 1"):
        mae_attention_mass(model, torch.randn(1, 3, 32, 32), torch.rand(1, L), verify=True)


def test_running_mass_pools_batches_of_any_size(tiny_model):
    model = tiny_model("mae_vit_tiny_patch16")
    torch.manual_seed(2)
    imgs, noise = torch.randn(3, 3, 32, 32), torch.rand(3, L)
    whole = AttentionMass(2)
    whole.add(*mae_attention_mass(model, imgs, noise), images=3)
    parts = AttentionMass(2)
    for sl in (slice(0, 1), slice(1, 3)):
        parts.add(*mae_attention_mass(model, imgs[sl], noise[sl]), images=sl.stop - sl.start)
    torch.testing.assert_close(parts.means(), whole.means())
    assert parts.images == 3


@pytest.mark.parametrize("kw, columns", [
    (dict(use_input=True), ["input", "block 0", "block 1"]),
    (dict(use_input=False, use_fm=[-1]), ["block 1"]),
])
def test_feature_weights_are_the_layer_weights(kw, columns, tiny_model):
    model = tiny_model("crossmae_vit_tiny_patch16", **kw)
    weights, rows, cols = feature_weights(model)
    assert torch.equal(weights, model.wfm.linear.weight.detach())
    assert cols == columns and rows == ["decoder 0", "decoder 1"]
