"""Layer-wise learning-rate decay (`detection.layer_decay`): ViTDet's rule and the optimizer's parameter groups."""
from functools import partial

import pytest
import torch
import torch.nn as nn

import detection  # noqa: F401  (makes detectron2 v0.6 importable)
from detectron2.config import LazyCall as L
from detectron2.config import instantiate
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detection.layer_decay import get_optimizer_params, get_vit_lr_decay_rate
from detection.vit import SimpleFeaturePyramid, ViT

TINY = dict(img_size=64, patch_size=16, embed_dim=16, depth=4, num_heads=2, mlp_ratio=2.0, use_rel_pos=True,
            window_size=2, window_block_indexes=(0, 2), norm_layer=partial(nn.LayerNorm, eps=1e-6))


def _pyramid(**kw) -> SimpleFeaturePyramid:
    net = ViT(**{**TINY, **kw})
    return SimpleFeaturePyramid(net, "last_feat", 8, (4.0, 2.0, 1.0, 0.5), top_block=LastLevelMaxPool(), norm="LN")


def test_lr_decay_rate_rule():
    rate = partial(get_vit_lr_decay_rate, lr_decay_rate=0.5, num_layers=4)
    assert rate("backbone.net.pos_embed") == 0.5**5
    assert rate("backbone.net.patch_embed.proj.weight") == 0.5**5
    assert rate("backbone.net.blocks.0.attn.qkv.weight") == 0.5**4
    assert rate("backbone.net.blocks.3.mlp.fc1.bias") == 0.5**1
    assert rate("backbone.net.blocks.1.residual.conv1.weight") == 1.0
    assert rate("backbone.simfp_2.0.weight") == 1.0
    assert rate("roi_heads.box_head.fc1.weight") == 1.0


class _Detector(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = _pyramid(depth=2, residual_block_indexes=(1,))
        self.head = nn.Linear(8, 2)


def _group_of(groups: list[dict], model: nn.Module) -> dict[str, dict]:
    by_id = {id(p): g for g in groups for p in g["params"]}
    return {name: by_id[id(p)] for name, p in model.named_parameters() if id(p) in by_id}


def test_optimizer_groups_lr_and_weight_decay():
    model = _Detector()
    model.backbone.net.blocks[0].norm1.weight.requires_grad_(False)
    groups = get_optimizer_params(model, base_lr=1.0, weight_decay=0.1, weight_decay_norm=0.0,
                                  lr_factor_func=partial(get_vit_lr_decay_rate, num_layers=2, lr_decay_rate=0.5),
                                  overrides={"pos_embed": {"weight_decay": 0.0}})
    of = _group_of(groups, model)
    assert "backbone.net.blocks.0.norm1.weight" not in of  # frozen parameters are left out
    assert of["backbone.net.pos_embed"] == {**of["backbone.net.pos_embed"], "lr": 0.125, "weight_decay": 0.0}
    assert of["backbone.net.patch_embed.proj.weight"]["lr"] == 0.125
    assert of["backbone.net.patch_embed.proj.weight"]["weight_decay"] == 0.1
    assert (of["backbone.net.blocks.0.attn.qkv.weight"]["lr"], of["backbone.net.blocks.1.mlp.fc1.weight"]["lr"]) \
        == (0.25, 0.5)
    assert of["backbone.net.blocks.1.norm2.bias"]["weight_decay"] == 0.0
    assert of["backbone.net.blocks.0.attn.rel_pos_h"]["weight_decay"] == 0.1  # as in ViTDet
    residual_norm = of["backbone.net.blocks.1.residual.norm3.weight"]
    # ViTDet's channels-first "LN" is a plain nn.Module, no norm to detectron2's optimizer: decayed as weights
    assert (residual_norm["lr"], residual_norm["weight_decay"]) == (1.0, 0.1)  # conv branch: no layer decay
    assert of["backbone.simfp_2.1.weight"]["weight_decay"] == 0.1
    assert of["backbone.simfp_2.4.norm.bias"]["weight_decay"] == 0.1
    assert (of["head.weight"]["lr"], of["head.weight"]["weight_decay"]) == (1.0, 0.1)
    keys = [tuple(sorted((k, v) for k, v in g.items() if k != "params")) for g in groups]
    assert len(keys) == len(set(keys))  # one group per distinct hyperparameter set
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())


def test_optimizer_params_from_lazyconfig_apply_the_factor():
    model = _Detector()
    cfg = L(torch.optim.AdamW)(
        params=L(get_optimizer_params)(base_lr="${..lr}", weight_decay_norm=0.0,
                                       lr_factor_func=partial(get_vit_lr_decay_rate, num_layers=2, lr_decay_rate=0.5)),
        lr=2e-4, weight_decay=0.1)
    cfg.params.model = model
    opt = instantiate(cfg)
    of = _group_of(opt.param_groups, model)
    assert of["backbone.net.blocks.0.mlp.fc2.weight"]["lr"] == pytest.approx(2e-4 * 0.25)
    assert of["backbone.net.pos_embed"]["weight_decay"] == 0.0  # default overrides: no decay on pos_embed
    assert of["head.bias"]["lr"] == pytest.approx(2e-4) and of["head.bias"]["weight_decay"] == 0.1
    with pytest.raises(ValueError, match="base_lr"):
        get_optimizer_params(model, lr_factor_func=get_vit_lr_decay_rate)
