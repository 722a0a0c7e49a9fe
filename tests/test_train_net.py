"""tools/train_net.py end to end on CPU with the smoke config, its error messages, and the COCO recipes."""
import json
import math
from pathlib import Path

import pytest
import torch

import detection  # noqa: F401  (compat layer before detectron2)
from detection import train
from detection.cli import train_net as train_net_cli
from detection.cli import train_net_parser
from detectron2.config import LazyConfig

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs/demo/mask_rcnn_vit_smoke_builtin.py")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two Mask R-CNN iterations plus the final COCO evaluation, as `tools/train_net.py` runs them."""
    out = tmp_path_factory.mktemp("train_net") / "out"
    train.main(train_net_parser().parse_args(["--config-file", SMOKE, f"train.output_dir={out}"]))
    return out


def test_training_logs_finite_losses(trained):
    records = [json.loads(line) for line in (trained / "metrics.json").read_text().splitlines()]
    steps = [r for r in records if "total_loss" in r]
    assert [r["iteration"] for r in steps] == [0, 1]
    for r in steps:
        losses = {k: v for k, v in r.items() if k.startswith("loss_")}
        assert set(losses) == {"loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls", "loss_rpn_loc"}
        assert all(math.isfinite(v) for v in losses.values())
    assert any("bbox/AP" in r and "segm/AP" in r for r in records)  # EvalHook wrote AP to the storage
    assert (trained / "model_final.pth").is_file()


def test_ap_json_has_box_and_mask_ap(trained):
    ap = json.loads((trained / "ap.json").read_text())
    assert ap["iteration"] == 2
    for task in ("bbox", "segm"):
        for key in ("AP", "AP50", "AP75"):
            assert isinstance(ap[task][key], float) and 0.0 <= ap[task][key] <= 100.0


def test_eval_only_reproduces_the_final_evaluation(trained, tmp_path):
    args = train_net_parser().parse_args(
        ["--config-file", SMOKE, "--eval-only", f"train.output_dir={tmp_path}",
         f"train.init_checkpoint={trained / 'model_final.pth'}"])
    results = train.main(args)
    saved = json.loads((trained / "ap.json").read_text())
    assert json.loads((tmp_path / "ap.json").read_text())["bbox"] == saved["bbox"]
    assert results["segm"]["AP"] == pytest.approx(saved["segm"]["AP"])


@pytest.mark.parametrize("override, expected", [
    ("train.device=cuda", "train.device=cuda but CUDA is unavailable"),
    ("train.init_checkpoint=/nonexistent/w.pth", "train.init_checkpoint=/nonexistent/w.pth does not exist"),
    ("dataloader.train.dataset.names=nowhere_train", "'nowhere_train' is not registered"),
])
def test_cli_errors_are_one_line(override, expected, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train_net_cli(["--config-file", SMOKE, override]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1


def _coco(name: str):
    return LazyConfig.load(str(ROOT / "configs" / "COCO" / f"{name}.py"))


@pytest.mark.parametrize("size, dim, depth, heads, drop_path, decay, global_blocks", [
    ("b", 768, 12, 12, 0.1, 0.7, (2, 5, 8, 11)),
    ("l", 1024, 24, 16, 0.4, 0.8, (5, 11, 17, 23)),
    ("h", 1280, 32, 16, 0.5, 0.9, (7, 15, 23, 31)),
])
@pytest.mark.parametrize("arch", ["mask_rcnn", "cascade_mask_rcnn"])
def test_coco_configs_follow_the_vitdet_recipe(arch, size, dim, depth, heads, drop_path, decay, global_blocks):
    cfg = _coco(f"{arch}_vitdet_{size}_100ep")
    net = cfg.model.backbone.net
    assert (net.embed_dim, net.depth, net.num_heads, net.drop_path_rate, net.window_size) == (
        dim, depth, heads, drop_path, 14)
    assert sorted(set(range(depth)) - set(net.window_block_indexes)) == list(global_blocks)
    factor = cfg.optimizer.params.lr_factor_func
    assert factor.keywords == {"num_layers": depth, "lr_decay_rate": decay}
    assert factor("backbone.net.patch_embed.proj.weight") == pytest.approx(decay ** (depth + 1))
    assert (cfg.optimizer.lr, tuple(cfg.optimizer.betas), cfg.optimizer.weight_decay) == (1e-4, (0.9, 0.999), 0.1)
    assert cfg.train.max_iter == 184375 and cfg.train.amp.enabled
    sched = cfg.lr_multiplier
    assert list(sched.scheduler.milestones) == [163889, 177546] and sched.scheduler.num_updates == 184375
    assert sched.warmup_length * 184375 == pytest.approx(250)
    loader = cfg.dataloader.train
    assert loader.total_batch_size == 64 and loader.dataset.names == "coco_2017_train"
    resize, crop = loader.mapper.augmentations[1:]
    assert (resize.min_scale, resize.max_scale, resize.target_height, crop.crop_size, crop.pad) == (
        0.1, 2.0, 1024, [1024, 1024], True)
    assert cfg.dataloader.test.dataset.names == "coco_2017_val"
    roi = cfg.model.roi_heads
    if arch == "cascade_mask_rcnn":
        assert [m.thresholds for m in roi.proposal_matchers] == [[0.5], [0.6], [0.7]]
        assert len(roi.box_heads) == len(roi.box_predictors) == 3 and "box_head" not in roi
    else:
        assert (list(roi.box_head.conv_dims), list(roi.box_head.fc_dims)) == ([256] * 4, [1024])
    assert list(cfg.model.proposal_generator.head.conv_dims) == [-1, -1]


def test_coco_config_builds_a_vitdet_b_mask_rcnn_with_layer_decay():
    from detectron2.config import instantiate
    from detectron2.modeling.roi_heads import StandardROIHeads

    cfg = _coco("mask_rcnn_vitdet_b_100ep")
    model = instantiate(cfg.model)
    assert isinstance(model.roi_heads, StandardROIHeads)
    assert model.roi_heads.box_head.conv1.norm.__class__.__name__.startswith("LayerNorm")
    cfg.optimizer.params.model = model
    groups = instantiate(cfg.optimizer).param_groups
    patch = model.backbone.net.patch_embed.proj.weight
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert lr_of[id(patch)] == pytest.approx(1e-4 * 0.7 ** 13)
    assert lr_of[id(model.roi_heads.box_predictor.cls_score.weight)] == pytest.approx(1e-4)
    assert wd_of[id(model.backbone.net.pos_embed)] == 0.0 and wd_of[id(patch)] == 0.1


def test_polygon_crops_need_shapely_and_the_demo_mapper_does_not():
    demo = LazyConfig.load(str(ROOT / "configs/demo/mask_rcnn_vit_tiny_builtin.py"))
    assert train._mapper_crops_polygons(_coco("mask_rcnn_vitdet_b_100ep").dataloader.train.mapper)
    assert not train._mapper_crops_polygons(demo.dataloader.train.mapper)
