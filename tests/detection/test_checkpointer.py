"""detectron2's checkpointer made safe (`detection.checkpointer.SafeCheckpointer`): a pretraining or other-library
file converted on the fly, pickles only when trusted, and an init checkpoint that leaves backbone weights unset
refused."""
import logging
import pickle
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import detection  # noqa: F401  (makes detectron2 v0.6 importable)
from detection import cli as detection_cli
from detection.checkpointer import SafeCheckpointer
from detection.vit import ViT
from pretrain.errors import CheckpointError
from pretrain.models import create_model

D, HEADS, PATCH, IMG = 192, 3, 8, 32  # conftest's weights files: the ViT-Ti width, patch 8, 32 px
ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "configs/demo/mask_rcnn_vit_smoke_builtin.py")


def _vitdet(patch: int = PATCH, pretrain_img_size: int = IMG, img: int = IMG) -> ViT:
    return ViT(img_size=img, patch_size=patch, embed_dim=D, depth=2, num_heads=HEADS, mlp_ratio=4.0,
               pretrain_img_size=pretrain_img_size, norm_layer=partial(nn.LayerNorm, eps=1e-6)).eval()


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_train_net_checkpointer_converts_a_pretraining_file_on_the_fly(timm_files):
    class Detector(nn.Module):
        def __init__(self, pretrain_img_size: int) -> None:
            super().__init__()
            self.backbone = nn.Module()
            self.backbone.net = _vitdet(pretrain_img_size=pretrain_img_size)

    model = Detector(IMG)
    checkpointer = SafeCheckpointer(model)
    records, level = _Records(), checkpointer.logger.level
    checkpointer.logger.addHandler(records)
    checkpointer.logger.setLevel(logging.INFO)
    try:
        checkpointer.load(str(timm_files[1] / "model.safetensors"))
    finally:
        checkpointer.logger.removeHandler(records)
        checkpointer.logger.setLevel(level)
    assert any("converted for ViTDet" in m for m in records.messages)
    assert torch.equal(model.backbone.net.blocks[1].mlp.fc1.weight, timm_files[0].blocks[1].mlp.fc1.weight)
    assert model.backbone.net.pos_embed.shape == (1, 1 + 4 * 4, D)
    # a ViT built for another pretraining grid: refused in one line, naming the override that fits the file
    with pytest.raises(CheckpointError, match=f"model.backbone.net.pretrain_img_size={IMG}"):
        SafeCheckpointer(Detector(224)).load(str(timm_files[1] / "model.safetensors"))


def test_train_net_loads_a_pickle_only_when_trusted(tmp_path, one_error_line):
    # a benign model-zoo-style .pkl (numpy weights, as detectron2's zoo stores them): refused, then read on opt-in
    path = tmp_path / "zoo.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"roi_heads.box_predictor.cls_score.bias": np.zeros(5, np.float32)},
                     "__author__": "zoo"}, f)
    overrides = [f"train.init_checkpoint={path}", f"train.output_dir={tmp_path / 'o'}", "train.max_iter=1"]
    assert detection_cli.train_net(["--config-file", SMOKE, "--allow-partial-init", *overrides]) == 2
    one_error_line("is a pickle", "--trust-pickle")
    assert detection_cli.train_net(["--config-file", SMOKE, "--allow-partial-init", "--trust-pickle", *overrides]) == 0


@pytest.mark.parametrize("kind", ["unconverted", "wrong_size"])
def test_an_init_checkpoint_that_leaves_the_backbone_unset_fails(kind, tmp_path, tiny_cfg, one_error_line):
    path = tmp_path / f"{kind}.pth"
    if kind == "unconverted":  # a pretraining checkpoint is converted on the fly, but this one is wider than the ViT
        cfg = tiny_cfg(tmp_path)
        wider = create_model({**cfg, "model_kwargs": {**cfg["model_kwargs"], "embed_dim": 48}})
        torch.save({"model": wider.state_dict()}, path)
        needles = ("embed_dim=48", "does not match the target config")
    else:  # converted, but from a wider ViT than the config's
        torch.save({"model": {"backbone.net.patch_embed.proj.weight": torch.zeros(64, 3, 16, 16)}}, path)
        needles = ("leaves", "backbone weights unset", "--allow-partial-init")
    args = ["--config-file", SMOKE, f"train.init_checkpoint={path}", f"train.output_dir={tmp_path / 'o'}"]
    assert detection_cli.train_net(args) == 2
    one_error_line(*needles)


def test_an_init_checkpoint_with_a_wrong_shape_names_the_tensor_not_the_converter(timm_files, tmp_path):
    sd = load_file(timm_files[1] / "model.safetensors")
    sd["blocks.0.attn.qkv.weight"] = torch.zeros(7, 5)
    save_file(sd, tmp_path / "odd.safetensors")
    model = nn.Module()
    model.backbone = nn.Module()
    model.backbone.net = _vitdet()
    expected = rf"blocks.0.attn.qkv.weight has shape \(7, 5\), expected \({3 * D}, {D}\)"
    with pytest.raises(CheckpointError, match=expected):
        SafeCheckpointer(model).load(str(tmp_path / "odd.safetensors"))
