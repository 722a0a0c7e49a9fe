"""Analysis: recomputed decoder attention, mask-token attention mass, CrossMAE feature weights,
loading any pretraining checkpoint, and the two tools run in-process."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.models.vision_transformer import Block

from pretrain import cli
from pretrain.analysis.attention import (CLS, MASK, VISIBLE, AttentionMass, attention_mass_rows, attention_output, attention_probabilities, decoder_token_groups, feature_weights, mae_attention_mass)
from pretrain.models import create_model
from pretrain.training.config import DEFAULTS
from pretrain.data.images import Builtin, mask_noise, render_builtin_image
from pretrain.errors import CheckpointError
from pretrain.models import CrossMAE, build_model
from pretrain.weights.loading import load_pretrain_model

TINY = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32, decoder_num_heads=2)
L = 16  # (32 / 8) ** 2 patches; 4 visible at mask ratio 0.75


def tiny(name: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return build_model(name, img_size=32, decoder_depth=2, **{**TINY, **kw}).eval()


def save_ours(path: Path, name: str, seed: int = 0) -> Path:
    """A checkpoint in this project's format, as `pretrain.training.trainer` writes it."""
    cfg = {**DEFAULTS, "model": name, "model_kwargs": TINY, "decoder_depth": 2, "input_size": 32}
    torch.manual_seed(seed)
    model = create_model(cfg)
    torch.save({"model": model.state_dict(), "optimizer": {}, "scaler": {}, "epoch": 0, "config": cfg}, path)
    return path


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


def test_mae_attention_mass_matches_an_explicit_computation():
    model = tiny("mae_vit_tiny_patch16")
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


def test_table6_statistic_is_the_per_key_attention_summed_over_heads():
    """Table 6's reading: per block, a mask query's attention on one key of a group, averaged over the queries
    (and images) and the group's keys, summed over heads; then summed over blocks. Written out here key by key."""
    model = tiny("mae_vit_tiny_patch16")
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


def test_uniform_attention_gives_token_shares():
    # zero q and k: every query spreads its attention evenly over cls + 16 patches
    model = tiny("mae_vit_tiny_patch16")
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


def test_verify_catches_a_recomputation_that_differs_from_the_block():
    model = tiny("mae_vit_tiny_patch16")
    model.decoder_blocks[1].attn.fused_attn = True
    model.decoder_blocks[1].attn.scale = 1.0  # SDPA ignores it; the recomputation would not
    with pytest.raises(RuntimeError, match="decoder block 1"):
        mae_attention_mass(model, torch.randn(1, 3, 32, 32), torch.rand(1, L), verify=True)


def test_running_mass_pools_batches_of_any_size():
    model = tiny("mae_vit_tiny_patch16")
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
def test_feature_weights_are_the_layer_weights(kw, columns):
    model = tiny("crossmae_vit_tiny_patch16", **kw)
    weights, rows, cols = feature_weights(model)
    assert torch.equal(weights, model.wfm.linear.weight.detach())
    assert cols == columns and rows == ["decoder 0", "decoder 1"]


# ------------------------------------------------------------------ loading checkpoints

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


def test_unknown_width_needs_model_flag(tmp_path):
    path = tmp_path / "odd.pth"
    torch.save({"model": tiny("mae_vit_tiny_patch16").state_dict()}, path)  # width 32: no registered size
    with pytest.raises(CheckpointError, match="pass --model NAME") as e:
        load_pretrain_model(path)
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="is not a mae model"):
        load_pretrain_model(path, model_name="crossmae_vit_tiny_patch16")


def _wrong_kind(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.pth"
    mae_sd = tiny("mae_vit_tiny_patch16").state_dict()
    if kind == "detectron2":
        torch.save({"model": {"backbone.net.blocks.0.attn.qkv.weight": torch.zeros(3, 1),
                              "roi_heads.box_predictor.cls_score.weight": torch.zeros(2, 1)}, "iteration": 5}, path)
    elif kind == "encoder_only":
        torch.save({"model": {k: v for k, v in mae_sd.items() if not k.startswith(("decoder", "mask_token"))},
                    "meta": {}}, path)
    elif kind == "not_a_checkpoint":
        path.write_text("hello\n")
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    return path


@pytest.mark.parametrize("kind, message", [
    ("detectron2", "detectron2"),
    ("encoder_only", "encoder only"),
    ("not_a_checkpoint", "not a torch checkpoint"),
    ("tensor", "not a checkpoint dict"),
    ("missing", "not found"),
])
@pytest.mark.parametrize("tool", [cli.visualize, cli.analyze_attention])
def test_wrong_kind_of_file_is_a_one_line_error(tmp_path, kind, message, tool, capsys):
    path = _wrong_kind(tmp_path, kind)
    assert tool([str(path), "--builtin", "1", "--output", str(tmp_path / "out"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


# ------------------------------------------------------------------ the tools

def test_mask_noise_depends_only_on_seed_and_index():
    both = mask_noise([3, 7], L, seed=5)
    torch.testing.assert_close(both[1], mask_noise([7], L, seed=5)[0])
    assert not torch.equal(both[0], both[1]) and not torch.equal(both, mask_noise([3, 7], L, seed=6))


def test_visualize_writes_reproducible_grids(tmp_path):
    ckpt = save_ours(tmp_path / "mae.pth", "mae_vit_tiny_patch16")

    def run(out: str, seed: int) -> list[Path]:
        assert cli.visualize([str(ckpt), "--builtin", "3", "--batch_size", "2", "--seed", str(seed),
                              "--output", str(tmp_path / out), "--device", "cpu"]) == 0
        return sorted((tmp_path / out).glob("recon_*.png"))

    a, b, c = run("a", 0), run("b", 0), run("c", 1)
    assert [p.name for p in a] == ["recon_00000.png", "recon_00002.png"]
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]  # same seed, same masks
    assert a[0].read_bytes() != c[0].read_bytes()
    assert Image.open(a[0]).size[0] > 100
    assert len((tmp_path / "a" / "images.tsv").read_text().splitlines()) == 1 + 3


def test_visualize_reads_a_folder_and_skips_unreadable_files(tmp_path, capsys):
    folder = tmp_path / "imgs" / "sub"
    folder.mkdir(parents=True)
    for i in range(2):
        Image.fromarray(render_builtin_image(i, 40)).save(folder / f"im{i}.png")
    (folder / "broken.jpg").write_bytes(b"not an image")
    ckpt = save_ours(tmp_path / "cross.pth", "crossmae_vit_tiny_patch16")
    assert cli.visualize([str(ckpt), str(tmp_path / "imgs"), "--output", str(tmp_path / "out"),
                          "--device", "cpu", "--prediction_ratio", "0.25"]) == 0
    written = list((tmp_path / "out").glob("recon_*.png"))
    assert len(written) == 1 and written[0].is_file()
    out = capsys.readouterr().out
    assert "skipped unreadable image" in out and "broken.jpg" in out and "2 images" in out
    assert cli.visualize([str(ckpt), str(tmp_path / "nowhere"), "--output", str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_analyze_attention_mae_writes_the_table(tmp_path):
    ckpt = save_ours(tmp_path / "mae.pth", "mae_vit_tiny_patch16")
    out = tmp_path / "att"
    assert cli.analyze_attention([str(ckpt), "--builtin", "5", "--batch_size", "2", "--seed", "4",
                                  "--output", str(out), "--device", "cpu"]) == 0
    for suffix in ("md", "csv", "json", "png"):
        assert (out / f"attention.{suffix}").is_file(), suffix
    result = json.loads((out / "attention.json").read_text())
    rows = result["rows"]
    assert result["images"] == 5 and [r["block"] for r in rows] == ["0", "1", "sum"]
    assert list(rows[0]) == ["block", "visible", "mask", "visible_mass", "mask_mass", "visible_patches_mass",
                             "cls_mass"]
    for r in rows[:2]:
        assert r["visible_mass"] + r["mask_mass"] == pytest.approx(1.0)
        assert r["visible_mass"] == pytest.approx(r["visible_patches_mass"] + r["cls_mass"])
    assert rows[2]["mask"] == pytest.approx(rows[0]["mask"] + rows[1]["mask"])
    assert (result["visible_keys"], result["mask_keys"], result["num_heads"]) == (5, 12, 2)
    assert "Table 6" in result["columns"]["visible, mask"]
    assert "Table 6" in (out / "attention.md").read_text()  # the table says which column is which

    model, _ = load_pretrain_model(ckpt)  # the same statistics, computed here in one batch
    images = Builtin(5, 32, seed=4)
    imgs = torch.stack([images[i][0] for i in range(5)])
    sums, count = mae_attention_mass(model, imgs, mask_noise(range(5), L, seed=4))
    assert rows[0]["mask_mass"] == pytest.approx(float(sums[0, MASK] / count), rel=1e-6)
    assert rows[0]["mask"] == pytest.approx(float(sums[0, MASK] / count) * 2 / 12, rel=1e-6)  # 2 heads, 12 keys
    with open(out / "attention.csv") as f:
        assert float(list(csv.DictReader(f))[1]["visible"]) == pytest.approx(rows[1]["visible"])


def test_analyze_attention_crossmae_reports_feature_weights(tmp_path, capsys):
    ckpt = save_ours(tmp_path / "cross.pth", "crossmae_vit_tiny_patch16", seed=3)
    out = tmp_path / "att"
    assert cli.analyze_attention([str(ckpt), "--output", str(out), "--device", "cpu"]) == 0
    assert "no self-attention between mask tokens" in capsys.readouterr().out
    assert (out / "feature_weights.png").is_file() and (out / "feature_weights.md").is_file()
    with open(out / "feature_weights.csv") as f:
        rows = list(csv.DictReader(f))
    table = np.array([[float(r[c]) for c in ("input", "block 0", "block 1")] for r in rows])
    weights = torch.load(ckpt, weights_only=True)["model"]["wfm.linear.weight"].numpy()
    np.testing.assert_allclose(table, weights, rtol=1e-6)
    assert not (out / "attention.json").exists()
