"""Checkpoint hand-off from MAE / CrossMAE / timm encoders to the detectron2 ViTDet adapter (`detection.convert`,
`detection.cli.convert`): keys and values, refusals, resampling a patch and keeping the pretrained grid, atomic
writes, and corrupt files named as such."""
import argparse
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from timm.models.vision_transformer import VisionTransformer

import detection  # noqa: F401  (makes detectron2 v0.6 importable)
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detection import train
from detection.checkpointer import SafeCheckpointer
from detection.cli import convert as convert_main
from detection.cli import train_net_parser
from detection.convert import convert_checkpoint, to_vitdet
from detection.vit import SimpleFeaturePyramid, ViT
from pretrain import files as files_mod
from pretrain.errors import CheckpointError
from pretrain.models import create_model
from pretrain.models.mae import MAE
from pretrain.training.config import DEFAULTS
from pretrain.weights.loading import state_dict_of

D, DEPTH, PATCH = 16, 2, 16
TI, TI_PATCH, TI_IMG = 192, 8, 32  # conftest's weights files: ViT-Ti width, patch 8, 32 px
ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "configs/demo/mask_rcnn_vit_smoke_builtin.py")


def _encoder(embed_dim: int = D, depth: int = DEPTH, **kw) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=224, patch_size=PATCH, embed_dim=embed_dim, depth=depth, num_heads=2,
                             mlp_ratio=2.0, num_classes=0, **kw).eval()


def _pretrain_checkpoint(embed_dim: int = D, depth: int = DEPTH) -> dict:
    """MAE / CrossMAE layout: encoder with timm names plus decoder, mask token and CrossMAE feature mixing."""
    sd = dict(_encoder(embed_dim, depth).state_dict())
    sd.update({"mask_token": torch.zeros(1, 1, 8), "decoder_embed.weight": torch.randn(8, embed_dim),
               "decoder_pos_embed": torch.zeros(1, 197, 8), "decoder_blocks.0.attn.qkv.weight": torch.randn(24, 8),
               "decoder_norm.weight": torch.ones(8), "decoder_pred.weight": torch.randn(768, 8),
               "wfm.weight": torch.randn(1, depth + 1), "dec_norms.0.weight": torch.ones(embed_dim)})
    return {"model": sd, "epoch": 3, "config": {"model": "crossmae_tiny"}}


class _Detector(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        net = ViT(img_size=64, patch_size=PATCH, embed_dim=D, depth=DEPTH, num_heads=2, mlp_ratio=2.0,
                  use_rel_pos=True, window_size=2, window_block_indexes=(0,), norm_layer=partial(nn.LayerNorm, eps=1e-6))
        self.backbone = SimpleFeaturePyramid(net, "last_feat", 8, (4.0, 2.0, 1.0, 0.5), LastLevelMaxPool())


def test_convert_pretraining_checkpoint_keys_and_values():
    ckpt = _pretrain_checkpoint()
    new_sd, report = to_vitdet(state_dict_of(ckpt), embed_dim=D, depth=DEPTH, patch_size=PATCH, pretrain_img_size=224)
    used, ignored = report.loaded, [k for keys in report.dropped.values() for k in keys]
    assert report.dropped["decoder"] and report.dropped["mask_token"] == ["mask_token"]
    assert report.dropped["norm"] == ["norm.bias", "norm.weight"] and report.dropped["cls_token"] == ["cls_token"]
    src = ckpt["model"]
    assert set(used) | set(ignored) == set(src) and not set(used) & set(ignored)
    assert {"cls_token", "norm.weight", "norm.bias", "mask_token", "decoder_embed.weight", "decoder_pos_embed",
            "wfm.weight", "dec_norms.0.weight"} <= set(ignored)
    assert all(k.startswith(("blocks.", "patch_embed.", "pos_embed")) for k in used)
    for k in used:
        assert torch.equal(new_sd["backbone.net." + k], src[k])
    vit_keys = {"backbone.net." + k for k in _Detector().backbone.net.state_dict()}
    assert set(new_sd) == {k for k in vit_keys if ".rel_pos_" not in k}


def test_cli_output_loads_into_detectron2(tmp_path, capsys):
    src, out = tmp_path / "pretrain.pth", tmp_path / "d2.pth"
    ckpt = _pretrain_checkpoint()
    ckpt["model"] = {"module." + k: v for k, v in ckpt["model"].items()}  # saved from the DDP wrapper
    torch.save(ckpt, src)
    assert convert_main([str(src), str(out), "--embed-dim", str(D), "--depth", str(DEPTH),
                         "--patch-size", str(PATCH)]) == 0
    printed = capsys.readouterr().out
    assert "used" in printed and "decoder_embed.weight" in printed and "blocks.*.attn.qkv.weight" in printed
    saved = torch.load(out, weights_only=True)
    assert set(saved) == {"model", "__author__"}

    model = _Detector()
    missing = model.load_state_dict(saved["model"], strict=False).missing_keys
    assert {k for k in missing if k.startswith("backbone.net.")} == {
        f"backbone.net.blocks.{i}.attn.rel_pos_{a}" for i in range(DEPTH) for a in "hw"}
    model = _Detector()
    DetectionCheckpointer(model).load(str(out))
    assert torch.equal(model.backbone.net.blocks[1].mlp.fc1.weight, ckpt["model"]["module.blocks.1.mlp.fc1.weight"])
    assert torch.equal(model.backbone.net.pos_embed, ckpt["model"]["module.pos_embed"])

    before = out.read_bytes()
    capsys.readouterr()
    # OUT exists: refuse without --overwrite
    assert convert_main([str(src), str(out), "--embed-dim", str(D), "--depth", str(DEPTH),
                         "--patch-size", str(PATCH)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == before


def test_refuses_encoder_of_another_size(tmp_path, capsys):
    large = _pretrain_checkpoint(embed_dim=24, depth=3)
    with pytest.raises(ValueError, match="embed_dim=24, depth=3.*embed_dim=16, depth=2"):
        to_vitdet(state_dict_of(large), embed_dim=D, depth=DEPTH, patch_size=PATCH)
    src, out = tmp_path / "large.pth", tmp_path / "d2.pth"
    torch.save(large, src)
    assert convert_main([str(src), str(out), "--embed-dim", str(D), "--depth", str(DEPTH),
                         "--patch-size", str(PATCH)]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not match the target config" in err and len(err.splitlines()) == 1
    assert not out.exists()
    with pytest.raises(ValueError, match="patch_size=16.*patch_size=14"):  # a patch is only ever resampled up
        to_vitdet(state_dict_of(large), patch_size=14)
    with pytest.raises(ValueError, match="patch_embed"):
        to_vitdet({"decoder_embed.weight": torch.zeros(2, 2)})


def test_bare_timm_state_dict_without_cls_slot_gives_timm_features(tmp_path):
    enc = _encoder(class_token=False, global_pool="avg")  # pos_embed (1, 196, D): a cls slot is added
    sd = enc.state_dict()
    assert sd["pos_embed"].shape == (1, 196, D)
    new_sd, report = to_vitdet(sd, embed_dim=D, depth=DEPTH, patch_size=PATCH)
    assert new_sd["backbone.net.pos_embed"].shape == (1, 197, D)
    assert report.dropped["fc_norm"] == ["fc_norm.bias", "fc_norm.weight"]  # avg-pool timm models norm after pooling
    vit = ViT(img_size=224, patch_size=PATCH, embed_dim=D, depth=DEPTH, num_heads=2, mlp_ratio=2.0,
              norm_layer=partial(nn.LayerNorm, eps=1e-6)).eval()
    missing, unexpected = vit.load_state_dict({k[len("backbone.net."):]: v for k, v in new_sd.items()}, strict=False)
    assert missing == [] and unexpected == []
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        want = enc.blocks(enc._pos_embed(enc.patch_embed(x))).reshape(1, 14, 14, D).permute(0, 3, 1, 2)
        assert torch.allclose(vit(x)["last_feat"], want, atol=1e-5)


def test_config_flag_reads_lazyconfig(tmp_path):
    cfg = tmp_path / "vitdet_tiny.py"
    cfg.write_text("from omegaconf import OmegaConf\n"
                   "model = OmegaConf.create({'backbone': {'net': {'embed_dim': 24, 'depth': 3, 'patch_size': 16,"
                   " 'pretrain_img_size': 224}}})\n")
    src, out = tmp_path / "pretrain.pth", tmp_path / "d2.pth"
    torch.save(_pretrain_checkpoint(), src)
    assert convert_main([str(src), str(out), "--config", str(cfg)]) == 2  # ViT with D=16 into a D=24 config
    torch.save(_pretrain_checkpoint(embed_dim=24, depth=3), src)
    assert convert_main([str(src), str(out), "--config", str(cfg)]) == 0
    assert torch.load(out, weights_only=True)["model"]["backbone.net.patch_embed.proj.weight"].shape[0] == 24


def test_pickled_objects_need_trust_flag(tmp_path, capsys):
    src, out = tmp_path / "released.pth", tmp_path / "d2.pth"
    torch.save({**_pretrain_checkpoint(), "args": argparse.Namespace(lr=1e-3)}, src)  # as MAE's main_pretrain saves
    flags = [str(src), str(out), "--embed-dim", str(D), "--depth", str(DEPTH), "--patch-size", str(PATCH)]
    assert convert_main(flags) == 2
    assert "--trust-pickle" in capsys.readouterr().err and not out.exists()
    assert convert_main(flags + ["--trust-pickle"]) == 0 and out.exists()


def test_a_pretraining_at_another_resolution_reaches_vitdet_through_one_override(tmp_path, capsys):
    """CrossMAE's ViT-B/448 path in miniature: an encoder pretrained at 128 px (8 x 8 pos_embed) into the smoke
    config (pretrain_img_size 96): converter and train_net take the same `pretrain_img_size` override."""
    cfg = {**DEFAULTS, "model": "crossmae_vit_tiny_patch16", "input_size": 128, "decoder_depth": 1,
           "model_kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2, "decoder_embed_dim": 32,
                            "decoder_num_heads": 2}}
    torch.manual_seed(0)
    pretrained = create_model(cfg)
    src, out = tmp_path / "pretrain_128.pth", tmp_path / "d2.pth"
    torch.save({"model": pretrained.state_dict(), "optimizer": {}, "epoch": 0, "config": cfg}, src)
    override = "model.backbone.net.pretrain_img_size=128"

    assert convert_main([str(src), str(out), "--config", SMOKE]) == 2  # the config's 96 px grid: refused
    err = capsys.readouterr().err
    assert override in err and err.count("\n") == 1 and not out.exists()
    assert convert_main([str(src), str(out), "--config", SMOKE, "model.backbone.net.pretrain_img_sise=128"]) == 2
    assert "did you mean model.backbone.net.pretrain_img_size" in capsys.readouterr().err
    assert convert_main([str(src), str(out), "--config", SMOKE, override]) == 0
    converted = torch.load(out, weights_only=True)["model"]
    assert converted["backbone.net.pos_embed"].shape == (1, 1 + 8 * 8, 32)

    # train_net without the override names it; with it, every backbone weight loads and training runs
    with pytest.raises(CheckpointError, match=override):
        SafeCheckpointer(instantiate(LazyConfig.load(SMOKE).model)).load(str(out))
    run_dir = tmp_path / "det"
    train.main(train_net_parser().parse_args(["--config-file", SMOKE, f"train.output_dir={run_dir}",
                                              f"train.init_checkpoint={out}", override]))
    final = torch.load(run_dir / "model_final.pth", weights_only=True)["model"]
    assert final["backbone.net.pos_embed"].shape == (1, 65, 32)
    # two steps at lr <= 1e-4 move the pretrained weights by less than 1e-3 (ViTDet's random init: std 0.02)
    torch.testing.assert_close(final["backbone.net.blocks.0.attn.qkv.weight"],
                               pretrained.state_dict()["blocks.0.attn.qkv.weight"], rtol=0, atol=1e-3)


def test_patch_14_to_16_resamples_kernel_and_position_grid():
    """MAE's ViT-H/14 into ViTDet's patch-16 ViT-H: timm's resample_patch_embed keeps each patch's projection
    (the new kernel on a bicubically resized patch gives the old kernel's value), the grid follows the target."""
    torch.manual_seed(0)
    sd = {"patch_embed.proj.weight": torch.randn(TI, 3, 14, 14), "patch_embed.proj.bias": torch.randn(TI),
          "pos_embed": torch.randn(1, 1 + 16 * 16, TI), "cls_token": torch.randn(1, 1, TI),
          "blocks.0.norm1.weight": torch.randn(TI)}
    new_sd, report = to_vitdet(sd, embed_dim=TI, depth=1, patch_size=16, pretrain_img_size=224)
    kernel, pos = new_sd["backbone.net.patch_embed.proj.weight"], new_sd["backbone.net.pos_embed"]
    assert kernel.shape == (TI, 3, 16, 16) and pos.shape == (1, 1 + 14 * 14, TI)
    torch.testing.assert_close(kernel, resample_patch_embed(sd["patch_embed.proj.weight"], [16, 16]))
    torch.testing.assert_close(pos, resample_abs_pos_embed(sd["pos_embed"], [14, 14], num_prefix_tokens=1))
    torch.testing.assert_close(pos[:, :1], sd["pos_embed"][:, :1])  # the cls slot is kept as it is
    assert [n.split(":")[0] for n in report.resized] == ["patch_embed.proj.weight", "pos_embed"]

    patch = torch.randn(4, 3, 14, 14)
    resized = F.interpolate(patch, size=(16, 16), mode="bicubic", antialias=True, align_corners=False)
    old = torch.einsum("dchw,nchw->nd", sd["patch_embed.proj.weight"], patch)
    torch.testing.assert_close(torch.einsum("dchw,nchw->nd", kernel, resized), old, rtol=1e-5, atol=2e-4)


def test_the_pretrained_grid_is_kept_or_refused_with_the_override_that_fits(tmp_path, finetuned_crossmae):
    """Into ViTDet the pretrained grid is kept (ViTDet resizes it once, at forward time) and a config asking for
    another one is refused with the override that fits; a resampled patch takes its grid along (see the ViT-H/14
    test). (Resampling itself: tests/pretrain/weights/test_fit.py.)"""
    finetuned_crossmae(tmp_path / "ft.pth")  # 32 px, 4 x 4 grid
    target = {"embed_dim": TI, "depth": 2, "patch_size": TI_PATCH}
    with pytest.raises(CheckpointError, match=f"model.backbone.net.pretrain_img_size={TI_IMG}"):
        convert_checkpoint(tmp_path / "ft.pth", tmp_path / "d2.pth", {**target, "pretrain_img_size": 2 * TI_IMG})
    report = convert_checkpoint(tmp_path / "ft.pth", tmp_path / "d2.pth", {**target, "pretrain_img_size": TI_IMG})
    assert report.resized == []
    assert torch.load(tmp_path / "d2.pth", weights_only=True)["model"]["backbone.net.pos_embed"].shape == (1, 17, TI)


def test_corrupt_bytes_are_not_blamed_on_pickles(tmp_path, one_error_line):
    good = tmp_path / "good.pth"
    torch.save({"model": {"a": torch.ones(2)}}, good)
    (tmp_path / "trunc.pth").write_bytes(good.read_bytes()[:40])
    (tmp_path / "text.pth").write_text("hello\n")
    (tmp_path / "words.pth").write_text("not a checkpoint")  # an opcode the weights-only unpickler refuses
    (tmp_path / "empty.pth").write_bytes(b"")
    for name, needle in (("trunc.pth", "corrupt"), ("text.pth", "corrupt"), ("words.pth", "corrupt"),
                         ("empty.pth", "empty (0 bytes)")):
        assert convert_main([str(tmp_path / name), str(tmp_path / "o.pth"), "--embed-dim", "2", "--depth",
                                      "1", "--patch-size", "8"]) == 2
        line = one_error_line(needle)
        assert "--trust-pickle" not in line


@pytest.mark.parametrize("case", ["wrong_shape", "nan"])
def test_a_wrong_shape_or_non_finite_tensor_is_not_converted(case, tmp_path, one_error_line):
    sd = dict(_encoder().state_dict())
    if case == "wrong_shape":  # a safetensors file with a 7 x 5 qkv weight
        sd["blocks.0.attn.qkv.weight"] = torch.zeros(7, 5)
        src, needles = tmp_path / "odd.safetensors", ("blocks.0.attn.qkv.weight has shape (7, 5)", "expected (48, 16)")
        save_file(sd, src)
    else:  # a checkpoint of NaN weights, as a diverged run saves
        sd = {k: torch.full_like(v, float("nan")) for k, v in sd.items()}
        src, needles = tmp_path / "nan.pth", ("NaN or infinite",)
        torch.save({"model": sd}, src)
    out = tmp_path / "d2.pth"
    assert convert_main([str(src), str(out), "--embed-dim", str(D), "--depth", str(DEPTH),
                         "--patch-size", str(PATCH)]) == 2
    one_error_line(*needles)
    assert not out.exists()


def test_the_converter_writes_atomically(tmp_path, monkeypatch, tiny_cfg):
    # (the trainer's half of this check: tests/pretrain/training/test_trainer.py)
    src = tmp_path / "src.pth"
    torch.save({"model": create_model(tiny_cfg(tmp_path, epochs=1)).state_dict()}, src)

    def dies(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(files_mod.torch, "save", dies)
    dst = tmp_path / "d2.pth"
    assert convert_main([str(src), str(dst), "--embed-dim", "32", "--depth", "2", "--patch-size", "8"]) == 130
    assert not dst.exists() and not list(tmp_path.glob(".d2.pth.*"))  # a retry is not blocked by a 0-byte file


def test_a_pretrained_encoder_with_cls_token_reaches_vitdet_as_its_blocks_without_the_cls_token():
    """ViTDet drops the cls token: the converted backbone (one global window, no relative positions) computes the
    pretraining encoder's blocks on the patch tokens alone, the same weights on the same image."""
    torch.manual_seed(0)
    mae = MAE(img_size=32, patch_size=PATCH, embed_dim=D, depth=DEPTH, num_heads=2, decoder_embed_dim=8,
              decoder_depth=1, decoder_num_heads=2, mlp_ratio=2.0).eval()
    for p in mae.parameters():  # trained weights, not the zero-bias init: every tensor matters
        p.data.add_(0.1 * torch.randn_like(p))
    new_sd, _ = to_vitdet(mae.state_dict(), embed_dim=D, depth=DEPTH, patch_size=PATCH, pretrain_img_size=32)
    vit = ViT(img_size=32, patch_size=PATCH, embed_dim=D, depth=DEPTH, num_heads=2, mlp_ratio=2.0,
              norm_layer=partial(nn.LayerNorm, eps=1e-6), pretrain_img_size=32).eval()
    missing, unexpected = vit.load_state_dict({k[len("backbone.net."):]: v for k, v in new_sd.items()}, strict=False)
    assert missing == [] and unexpected == []
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = mae.patch_embed(x) + mae.pos_embed[:, 1:]
        for blk in mae.blocks:
            tokens = blk(tokens)
        want = tokens.reshape(2, 2, 2, D).permute(0, 3, 1, 2)
        with_cls = mae.forward_features(x, torch.arange(4).expand(2, -1))[-1][:, 1:]
        got = vit(x)["last_feat"]
    assert torch.allclose(got, want, atol=1e-5)
    # and the cls token does change the encoder's own output: the equality above is not vacuous
    assert not torch.allclose(with_cls.reshape(2, 2, 2, D).permute(0, 3, 1, 2), want, atol=1e-3)
