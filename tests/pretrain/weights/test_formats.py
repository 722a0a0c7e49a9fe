"""One importer for every MAE-family layout: real timm and transformers models written in their own formats give
the same encoder features after import; official MAE / CrossMAE and mmpretrain files written with their documented
key names import to the official keys; every route (encoder, pretraining model, ViTDet) reports what it dropped,
resamples position embeddings and patch kernels, and refuses a tensor of the wrong shape in one line. The weights
files of other libraries are conftest's fixtures; the ViTDet route's own checks are in tests/detection."""
import re
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

import detection  # noqa: F401  (makes detectron2 v0.6 importable)
from detection.cli import convert as convert_main
from detection.vit import ViT
from pretrain.errors import CheckpointError
from pretrain.models import MAE, CrossMAE, build_model
from pretrain.weights.fit import load_model_weights
from pretrain.weights.formats import LAYOUTS, detect_layout, from_transformers, group_of, import_state_dict
from pretrain.weights.loading import load_encoder, load_encoder_into, load_pretrain_model, read_weights

DATA = Path(__file__).resolve().parents[2] / "data"  # tests/data
D, HEADS, PATCH, IMG = 192, 3, 8, 32  # conftest's weights files: the ViT-Ti width, from which loaders tell the heads
L = (IMG // PATCH) ** 2


def _images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, IMG, IMG, generator=torch.Generator().manual_seed(2))


def _ours(encoder: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Input embedding and every block's output (cls first) of our encoder over all patches in order."""
    with torch.no_grad():
        return encoder.forward_features(x, torch.arange(L).expand(len(x), -1))


# ---------------------------------------------------------------------------------------------------------- timm

@pytest.mark.parametrize("file", ["model.safetensors", "pytorch_model.bin"])
def test_timm_model_in_its_own_format_gives_its_features(timm_files, file):
    model, folder = timm_files
    encoder, info = load_encoder(folder / file)
    x = _images()
    with torch.no_grad():
        want = model.forward_features(x)  # (N, 1 + L, D) after the final norm
    got = encoder.norm(_ours(encoder, x)[-1])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert info["report"].layout == "official" and info["family"] is None
    if file == "model.safetensors":  # the folder save_for_hf wrote names the same file
        from_folder = load_encoder(folder)[0]
        torch.testing.assert_close(from_folder.norm(_ours(from_folder, x)[-1]), want, rtol=0, atol=1e-5)


# -------------------------------------------------------------------------------------------------- transformers

@pytest.mark.parametrize("variant", ["original", "modules", "hub"])
def test_transformers_vitmae_model_gives_its_features(hf_encoder, variant):
    model, files = hf_encoder
    encoder, info = load_encoder(files[variant])
    x = _images()
    with torch.no_grad():  # noise in patch order with mask ratio 0: every patch, unshuffled
        want = model(pixel_values=x, noise=torch.arange(L, dtype=torch.float).expand(len(x), -1)).last_hidden_state
    torch.testing.assert_close(encoder.norm(_ours(encoder, x)[-1]), want, rtol=0, atol=1e-5)
    assert info["report"].layout == "transformers"
    if variant == "hub":
        keys = torch.load(files[variant], weights_only=True)
        assert "encoder.layer.0.attention.attention.query.weight" in keys  # separate q, k, v were fused


@pytest.mark.parametrize("variant", ["original", "modules", "hub"])
def test_transformers_vitmae_for_pretraining_gives_its_reconstruction(hf_pretraining, variant):
    model, files = hf_pretraining
    ours, info = load_pretrain_model(files[variant])
    assert isinstance(ours, MAE) and info["report"].layout == "transformers"
    x = _images()
    noise = torch.rand(len(x), L, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(pixel_values=x, noise=noise)
        got = ours(x, noise=noise)
    assert torch.equal(got.mask, want.mask)
    torch.testing.assert_close(got.pred, want.logits, rtol=0, atol=1e-5)


def test_transformers_missing_value_tensor_is_one_line():
    sd = {"vit.embeddings.patch_embeddings.projection.weight": torch.zeros(4, 3, 2, 2),
          "vit.encoder.layer.0.attention.attention.query.weight": torch.zeros(4, 4),
          "vit.encoder.layer.0.attention.attention.key.weight": torch.zeros(4, 4)}
    with pytest.raises(CheckpointError, match="blocks.0.attn.qkv.weight") as e:
        from_transformers(sd)
    assert "\n" not in str(e.value)


def _small_vit() -> dict[str, torch.Tensor]:
    """A 2-block, 16-wide timm ViT/8 (MLP 32 wide) at 32 px, with a final norm."""
    torch.manual_seed(0)
    return dict(VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0,
                                  num_classes=0).state_dict())


@pytest.mark.parametrize("key, bad, expected", [
    ("blocks.0.attn.qkv.weight", (7, 5), "(48, 16)"),
    ("blocks.1.attn.qkv.bias", (47,), "(48,)"),
    ("blocks.1.mlp.fc2.weight", (16, 31), "(16, 32)"),
    ("pos_embed", (1, 17, 15), "(1, N, 16)"),
    ("cls_token", (16,), "(1, 1, 16)"),
    ("norm.weight", (16, 1), "(16,)"),
    ("patch_embed.proj.weight", (16, 3 * 8 * 8), "(embed_dim, channels, patch, patch)"),
])
def test_a_tensor_of_another_shape_than_its_encoder_is_refused_at_import(key, bad, expected):
    sd = _small_vit()
    sd[key] = torch.zeros(bad)
    with pytest.raises(CheckpointError) as e:
        import_state_dict({"model": sd}, "odd.pth")
    msg = str(e.value)
    assert f"{key} has shape {bad}" in msg and f"expected {expected}" in msg and "\n" not in msg, msg


def test_a_transformers_file_is_checked_after_its_query_key_value_are_joined():
    sd = {"vit.embeddings.patch_embeddings.projection.weight": _small_vit()["patch_embed.proj.weight"]}
    for part in ("query", "key", "value"):
        sd[f"vit.encoder.layer.0.attention.attention.{part}.weight"] = torch.zeros(16, 16)
    sd["vit.encoder.layer.0.attention.attention.value.weight"] = torch.zeros(5, 16)
    with pytest.raises(CheckpointError, match=r"blocks.0.attn.qkv.weight has shape \(37, 16\), expected \(48, 16\)"):
        import_state_dict(sd, "hf")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("key", ["blocks.1.mlp.fc1.bias", "decoder_pred.weight"])
def test_non_finite_weights_are_refused_at_import(key, value):
    sd = {**_small_vit(), "decoder_pred.weight": torch.ones(4, 8)}
    sd[key] = sd[key].clone()
    sd[key].view(-1)[1] = value
    with pytest.raises(CheckpointError) as e:
        import_state_dict(sd, "diverged.pth")
    msg = str(e.value)
    assert f"{key} {tuple(sd[key].shape)}" in msg and "1 NaN or infinite" in msg and "\n" not in msg, msg
    assert import_state_dict(_small_vit(), "fine.pth")[1].name == "official"


# --------------------------------------------------------------------------- official MAE / CrossMAE, mmpretrain

def _golden(name: str) -> dict:
    return torch.load(DATA / f"{name}.pt", weights_only=True)


def _golden_forward(golden: dict, state_dict: dict) -> torch.Tensor:
    model = (MAE if golden["kind"] == "mae" else CrossMAE)(**golden["model_kwargs"])
    load_model_weights(model, state_dict)
    with torch.no_grad():
        out = model(golden["imgs"], noise=golden["noise"])
    return out.pred if golden["kind"] == "mae" else out.pred[out.mask.bool()].reshape(golden["pred"].shape)


@pytest.mark.parametrize("name", ["mae_reference", "crossmae_reference"])
def test_official_files_import_unchanged_and_reproduce_the_golden_output(name, tmp_path):
    golden = _golden(name)
    path = tmp_path / "released.pth"
    torch.save({"model": golden["state_dict"]}, path)  # mae_visualize_*.pth, *_full.pth, *-pretrain-wfm-*.pth
    weights = read_weights(path)
    assert weights.layout == "official" and weights.state_dict.keys() == golden["state_dict"].keys()
    torch.testing.assert_close(_golden_forward(golden, weights.state_dict), golden["pred"], rtol=0, atol=1e-5)


def _to_mmpretrain(sd: dict) -> dict:
    """Official MAE keys renamed as mmpretrain names its MAE (`MAEViT` backbone, `MAEPretrainDecoder` neck)."""
    inner = {"norm1": "ln1", "norm2": "ln2", "attn.qkv": "attn.qkv", "attn.proj": "attn.proj",
             "mlp.fc1": "ffn.layers.0.0", "mlp.fc2": "ffn.layers.1"}
    out = {}
    for k, v in sd.items():
        if m := re.match(r"^(decoder_blocks|blocks)\.(\d+)\.(.+)\.(weight|bias)$", k):
            where = "neck.decoder_blocks" if m[1] == "decoder_blocks" else "backbone.layers"
            out[f"{where}.{m[2]}.{inner[m[3]]}.{m[4]}"] = v
        elif k in ("cls_token", "pos_embed"):
            out[f"backbone.{k}"] = v
        elif k.startswith("patch_embed.proj."):
            out["backbone.patch_embed.projection." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("norm."):
            out["backbone.ln1." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("decoder_norm."):
            out["neck.ln1." + k.rsplit(".", 1)[1]] = v
        else:  # mask_token, decoder_pos_embed, decoder_embed, decoder_pred
            out["neck." + k] = v
    return out


def test_mmpretrain_mae_imports_to_the_official_keys(tmp_path):
    golden = _golden("mae_reference")
    mm = _to_mmpretrain(golden["state_dict"])
    assert "backbone.layers.0.ffn.layers.0.0.weight" in mm and "neck.decoder_blocks.1.ln2.bias" in mm
    path = tmp_path / "mae_mmpretrain.pth"
    torch.save({"meta": {"mmpretrain_version": "1.2.0"}, "state_dict": mm}, path)  # mmengine's checkpoint layout
    weights = read_weights(path)
    assert weights.layout == "mmpretrain" and weights.state_dict.keys() == golden["state_dict"].keys()
    assert all(torch.equal(weights.state_dict[k], v) for k, v in golden["state_dict"].items())
    torch.testing.assert_close(_golden_forward(golden, weights.state_dict), golden["pred"], rtol=0, atol=1e-5)


def test_mmcv_multihead_attention_names_map_onto_qkv():
    sd = {"backbone.patch_embed.projection.weight": torch.zeros(4, 3, 2, 2),
          "backbone.layers.0.attn.attn.in_proj_weight": torch.ones(12, 4),
          "backbone.layers.0.attn.attn.out_proj.bias": torch.ones(4)}
    layout = detect_layout(sd)
    assert layout.name == "mmpretrain"
    assert set(layout.convert(sd)) == {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.bias"}


def test_finetuned_crossmae_gives_its_encoder_and_reports_the_dropped_head(tmp_path, finetuned_crossmae):
    vit = finetuned_crossmae(tmp_path / "crossmae-finetune.pth")
    encoder, info = load_encoder(tmp_path / "crossmae-finetune.pth")
    report = info["report"]
    assert report.dropped == {"fc_norm": ["fc_norm.bias", "fc_norm.weight"], "head": ["head.bias", "head.weight"]}
    assert encoder.norm is None and info["epoch"] == 99
    x = _images()
    with torch.no_grad():
        want = vit.blocks(vit._pos_embed(vit.patch_embed(x)))
    torch.testing.assert_close(_ours(encoder, x)[-1], want, rtol=0, atol=1e-5)
    assert "dropped head (2): head.bias, head.weight" in str(report)


def test_every_layout_has_a_name_and_one_function():
    assert [layout.name for layout in LAYOUTS] == ["detectron2", "mmpretrain", "transformers", "official"]
    assert {group_of(k) for k in ("decoder_blocks.0.mlp.fc1.weight", "wfm.linear.weight", "dec_norms.3.bias")} == {
        "decoder"}
    assert [group_of(k) for k in ("mask_token", "norm.weight", "cls_token", "head.weight", "blocks.0.attn.rel_pos_h",
                                  "roi_heads.box_head.fc1.weight", "blocks.1.mlp.fc2.bias")] == [
        "mask_token", "norm", "cls_token", "head", "rel_pos (ViTDet)", "detector (pyramid, heads)", "encoder"]


# ---------------------------------------------------------------------------------------------- into ViTDet

def _vitdet(patch: int = PATCH, pretrain_img_size: int = IMG, img: int = IMG) -> ViT:
    return ViT(img_size=img, patch_size=patch, embed_dim=D, depth=2, num_heads=HEADS, mlp_ratio=4.0,
               pretrain_img_size=pretrain_img_size, norm_layer=partial(nn.LayerNorm, eps=1e-6)).eval()


@pytest.mark.parametrize("source", ["timm", "transformers", "mmpretrain"])
def test_every_layout_goes_into_the_vitdet_backbone(source, timm_files, hf_encoder, tmp_path, capsys):
    if source == "timm":
        path = timm_files[1] / "model.safetensors"
    elif source == "transformers":
        path = hf_encoder[1]["original"]
    else:
        torch.save({"state_dict": _to_mmpretrain(timm_files[0].state_dict())}, tmp_path / "mm.pth")
        path = tmp_path / "mm.pth"
    encoder, _ = load_encoder(path)
    out = tmp_path / "d2.pth"
    assert convert_main([str(path), str(out), "--embed-dim", str(D), "--depth", "2", "--patch-size", str(PATCH),
                         "--pretrain-img-size", str(IMG)]) == 0
    printed = capsys.readouterr().out
    assert f"{source if source != 'timm' else 'official'} layout" in printed and "cls_token" in printed
    vit = _vitdet()
    sd = torch.load(out, weights_only=True)["model"]
    missing, unexpected = vit.load_state_dict({k[len("backbone.net."):]: v for k, v in sd.items()}, strict=False)
    assert missing == [] and unexpected == []
    x = _images(1)
    with torch.no_grad():  # ViTDet has no cls token: the encoder's blocks over the patch tokens alone
        tokens = encoder.patch_embed(x) + encoder.pos_embed[:, 1:]
        for blk in encoder.blocks:
            tokens = blk(tokens)
        want = tokens.reshape(1, IMG // PATCH, IMG // PATCH, D).permute(0, 3, 1, 2)
        torch.testing.assert_close(vit(x)["last_feat"], want, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------- into a pretraining model

def test_init_from_takes_any_layout_and_refuses_a_wrong_shape_in_one_line(hf_encoder, tmp_path):
    model = build_model("mae_vit_tiny_patch16", img_size=2 * IMG, patch_size=PATCH, depth=2, decoder_depth=1)
    replaced = load_encoder_into(model, hf_encoder[1]["hub"]).loaded  # a 4 x 4 grid into an 8 x 8 one: resampled
    assert "blocks.1.attn.qkv.weight" in replaced and model.pos_embed.shape == (1, 65, D)
    hf_qkv = torch.cat([hf_encoder[0].state_dict()[f"layers.0.attention.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(model.blocks[0].attn.qkv.weight, hf_qkv)

    sd = {k: v for k, v in load_encoder(hf_encoder[1]["hub"])[0].state_dict().items()}
    sd["blocks.1.mlp.fc1.weight"] = torch.zeros(7, D)
    torch.save({"model": sd}, tmp_path / "odd.pth")
    expected = r"blocks.1.mlp.fc1.weight has shape \(7, 192\), expected \(768, 192\)"
    with pytest.raises(CheckpointError, match=expected) as e:
        load_encoder_into(model, tmp_path / "odd.pth")
    assert "\n" not in str(e.value)
