"""tools/train_net.py end to end on CPU with the smoke config (`detection.train`), its error messages (a used output
folder, an image whose size differs from its json), and the COCO recipes."""
import contextlib
import io
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from timm.layers import LayerNorm2d

import detection  # noqa: F401  (compat layer before detectron2)
from detection import cli as detection_cli
from detection import train
from detection.cli import train_net as train_net_cli
from detection.cli import train_net_parser
from detection.datasets import write_builtin_shapes
from detectron2.config import LazyConfig, instantiate
from detectron2.data import DatasetCatalog
from detectron2.modeling.roi_heads import StandardROIHeads
from detectron2.structures import ImageList
from detectron2.utils.events import EventStorage
from pretrain.runlock import run_lock

ROOT = Path(__file__).resolve().parents[2]
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


def test_init_checkpoint_takes_a_save_pretrained_folder_as_the_converter_does(timm_files, tmp_path, one_error_line):
    args = ["--config-file", SMOKE, f"train.output_dir={tmp_path / 'o'}"]
    # read and converted (not "does not exist"): conftest's ViT-Ti is wider than the smoke config's ViT
    assert train_net_cli([*args, f"train.init_checkpoint={timm_files[1]}"]) == 2
    one_error_line("embed_dim=192", "does not match the target config")
    (tmp_path / "empty").mkdir()
    assert train_net_cli([*args, f"train.init_checkpoint={tmp_path / 'empty'}"]) == 2
    one_error_line("model.safetensors", "pytorch_model.bin")


def test_train_net_refuses_an_output_folder_holding_a_run(tmp_path, one_error_line):
    out = tmp_path / "det"
    out.mkdir()
    (out / "metrics.json").write_text("{}\n")
    assert detection_cli.train_net(["--config-file", SMOKE, f"train.output_dir={out}"]) == 2
    one_error_line("holds an earlier run", "--resume", "--overwrite")


@pytest.mark.parametrize("mode", [[], ["--resume"], ["--eval-only"]])
def test_train_net_refuses_an_output_folder_in_use_naming_the_holders_pid(mode, tmp_path, one_error_line):
    out = tmp_path / "det"
    weights = tmp_path / "w.pth"
    torch.save({"model": {}}, weights)
    with run_lock(out):  # as a first train_net (or pretraining, or demo) holds it
        assert detection_cli.train_net(["--config-file", SMOKE, *mode, f"train.output_dir={out}",
                                        f"train.init_checkpoint={weights if mode == ['--eval-only'] else ''}"]) == 2
    one_error_line("train.output_dir", "in use by another run", f"PID {os.getpid()}")
    assert [p.name for p in out.iterdir()] == [".lock"]  # nothing of the second run was written


def test_an_image_of_another_size_than_its_json_says_is_one_line(tmp_path, one_error_line):
    write_builtin_shapes(tmp_path / "s", num_train=2, num_val=1, image_size=64, seed=0)
    coco = json.loads((tmp_path / "s" / "annotations" / "train.json").read_text())
    coco["images"][0]["height"] = coco["images"][0]["width"] = 80
    (tmp_path / "s" / "annotations" / "train.json").write_text(json.dumps(coco))
    args = ["--config-file", SMOKE, "--dataset", "test_size_train", str(tmp_path / "s/annotations/train.json"),
            str(tmp_path / "s"), "dataloader.train.dataset.names=test_size_train", f"train.output_dir={tmp_path / 'o'}",
            "train.max_iter=4"]
    assert detection_cli.train_net(args) == 2
    one_error_line("Mismatched image shape", "check the width/height")


# ------------------------------------------------------------------------------------------ sets without masks

def _set_without(tmp_path: Path, name: str, what: str) -> tuple[list[str], list[str]]:
    """train_net's flags and key=value overrides for the shapes set (4 train, 2 val images of 64 px) with `what`
    removed from its json: "masks" (every segmentation an empty list), "mask_keys" (no segmentation key) or
    "annotations" (an empty list)."""
    folder = tmp_path / "set"
    write_builtin_shapes(folder, num_train=4, num_val=2, image_size=64, seed=0)
    args, overrides = ["--config-file", SMOKE], [f"train.output_dir={tmp_path / 'out'}"]
    for split in ("train", "val"):
        path = folder / "annotations" / f"{split}.json"
        coco = json.loads(path.read_text())
        if what == "annotations":
            coco["annotations"] = []
        for ann in coco["annotations"]:
            if what == "masks":
                ann["segmentation"] = []
            else:
                del ann["segmentation"]
        path.write_text(json.dumps(coco))
        args += ["--dataset", f"{name}_{split}", str(path), str(folder)]
        overrides.append(f"dataloader.{'train' if split == 'train' else 'test'}.dataset.names={name}_{split}")
    return args, overrides


@pytest.fixture(scope="module")
def box_only(tmp_path_factory):
    """(output dir, flags, log): two iterations and the evaluation on a set whose json has boxes only."""
    tmp_path = tmp_path_factory.mktemp("box_only")
    flags, overrides = _set_without(tmp_path, "test_box_only", "masks")
    with contextlib.redirect_stdout(io.StringIO()) as log:
        assert detection_cli.train_net([*flags, *overrides]) == 0
    return tmp_path / "out", flags, log.getvalue()


def test_a_set_without_masks_trains_and_evaluates_a_box_only_model(box_only):
    out, _, log = box_only
    records = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    steps = [r for r in records if "total_loss" in r]
    assert len(steps) == 2 and all("loss_mask" not in r and math.isfinite(r["loss_box_reg"]) for r in steps)
    ap = json.loads((out / "ap.json").read_text())
    assert set(ap) == {"bbox", "iteration"} and 0.0 <= ap["bbox"]["AP"] <= 100.0
    assert "dataset test_box_only_train has boxes but no masks: training a box-only model" in log
    assert not any(k.startswith("roi_heads.mask_head") for k in torch.load(out / "model_final.pth", weights_only=True)["model"])


def test_a_box_only_model_is_evaluated_alone_on_its_set(box_only, tmp_path):
    out, flags, _ = box_only
    results = train.main(train_net_parser().parse_args(
        [*flags, "--eval-only", f"train.init_checkpoint={out / 'model_final.pth'}", f"train.output_dir={tmp_path}",
         "dataloader.test.dataset.names=test_box_only_val"]))
    assert set(results) == {"bbox"}
    assert results["bbox"]["AP"] == pytest.approx(json.loads((out / "ap.json").read_text())["bbox"]["AP"])


def test_a_set_without_segmentation_keys_trains_box_only(tmp_path):
    flags, overrides = _set_without(tmp_path, "test_no_segm_key", "mask_keys")
    assert detection_cli.train_net([*flags, *overrides, "train.max_iter=1", "train.checkpointer.period=1"]) == 0
    assert set(json.loads((tmp_path / "out" / "ap.json").read_text())) == {"bbox", "iteration"}


def test_a_set_without_annotations_is_one_line(tmp_path, one_error_line):
    flags, overrides = _set_without(tmp_path, "test_no_annotations", "annotations")
    assert detection_cli.train_net([*flags, *overrides]) == 2
    one_error_line("dataset 'test_no_annotations_train' has no annotations")


def _coco(name: str):
    return LazyConfig.load(str(ROOT / "configs" / "COCO" / f"{name}.py"))


@pytest.mark.parametrize("size, dim, depth, heads, drop_path, decay, global_blocks", [
    ("b_100ep", 768, 12, 12, 0.1, 0.7, (2, 5, 8, 11)),
    ("l_100ep", 1024, 24, 16, 0.4, 0.8, (5, 11, 17, 23)),
    ("h_75ep", 1280, 32, 16, 0.5, 0.9, (7, 15, 23, 31)),
])
@pytest.mark.parametrize("arch", ["mask_rcnn", "cascade_mask_rcnn"])
def test_coco_configs_follow_the_vitdet_recipe(arch, size, dim, depth, heads, drop_path, decay, global_blocks):
    cfg = _coco(f"{arch}_vitdet_{size}")
    net = cfg.model.backbone.net
    assert (net.embed_dim, net.depth, net.num_heads, net.drop_path_rate, net.window_size) == (
        dim, depth, heads, drop_path, 14)
    assert sorted(set(range(depth)) - set(net.window_block_indexes)) == list(global_blocks)
    factor = cfg.optimizer.params.lr_factor_func
    assert factor.keywords == {"num_layers": depth, "lr_decay_rate": decay}
    assert factor("backbone.net.patch_embed.proj.weight") == pytest.approx(decay ** (depth + 1))
    assert (cfg.optimizer.lr, tuple(cfg.optimizer.betas), cfg.optimizer.weight_decay) == (1e-4, (0.9, 0.999), 0.1)
    sched = cfg.lr_multiplier
    if size == "h_75ep":  # ViTDet's H: 75 epochs, B's iterations and steps x 3 // 4, B's warm-up fraction
        assert cfg.train.max_iter == 138281 and sched.scheduler.num_updates == 138281
        assert list(sched.scheduler.milestones) == [163889 * 3 // 4, 177546 * 3 // 4] == [122916, 133159]
        assert sched.warmup_length == pytest.approx(250 / 184375, rel=1e-4)
    else:
        assert cfg.train.max_iter == 184375 and sched.scheduler.num_updates == 184375
        assert list(sched.scheduler.milestones) == [163889, 177546]
        assert sched.warmup_length * 184375 == pytest.approx(250)
    assert cfg.train.amp.enabled
    loader = cfg.dataloader.train
    assert loader.total_batch_size == 64 and loader.dataset.names == "coco_2017_train"
    resize, crop = loader.mapper.augmentations[1:]
    # no padding in the crop, as ViTDet: the backbone pads to the square (square_pad)
    assert (resize.min_scale, resize.max_scale, resize.target_height, crop.crop_size, crop.pad) == (
        0.1, 2.0, 1024, [1024, 1024], False)
    assert cfg.model.backbone.square_pad == 1024
    assert cfg.dataloader.test.dataset.names == "coco_2017_val"
    roi = cfg.model.roi_heads
    if arch == "cascade_mask_rcnn":
        assert [m.thresholds for m in roi.proposal_matchers] == [[0.5], [0.6], [0.7]]
        assert len(roi.box_heads) == len(roi.box_predictors) == 3 and "box_head" not in roi
    else:
        assert (list(roi.box_head.conv_dims), list(roi.box_head.fc_dims)) == ([256] * 4, [1024])
    assert list(cfg.model.proposal_generator.head.conv_dims) == [-1, -1]


@pytest.fixture(scope="module")
def coco_b():
    """The COCO ViT-B Mask R-CNN config and its model (built once: 100M parameters)."""
    cfg = _coco("mask_rcnn_vitdet_b_100ep")
    torch.manual_seed(0)
    return cfg, instantiate(cfg.model)


class _Reached(Exception):
    """Raised by a hook once the ViT's input is seen, so the test does not pay for a ViT-B forward at 1024 px."""


def _vit_input_shape(model, run) -> tuple[int, ...]:
    seen = []

    def stop(module, args):
        seen.append(args[0])
        raise _Reached

    handle = model.backbone.net.register_forward_pre_hook(stop)
    try:
        with pytest.raises(_Reached), torch.no_grad():
            run()
    finally:
        handle.remove()
    return seen[0]


def test_coco_b_model_sees_the_square_at_test_time_on_any_detectron2(coco_b):
    """A 768 x 1024 test image reaches the ViT as 1024 x 1024 (ViTDet's square, zeros after normalisation): on
    detectron2 v0.6, which pads only to a multiple of 32, and on one that pads to the square itself."""
    _, model = coco_b
    model.eval()
    image = torch.rand(3, 768, 1024) * 255
    x = _vit_input_shape(model, lambda: model([{"image": image}]))
    assert x.shape == (1, 3, 1024, 1024)
    normalised = (image - model.pixel_mean) / model.pixel_std
    torch.testing.assert_close(x[0, :, :768], normalised)
    assert not x[0, :, 768:].any()  # bottom padding: zeros, i.e. the pixel mean before normalisation

    # a detectron2 that pads to square_size itself (main's padding_constraints): no second pad
    padded = ImageList.from_tensors([normalised], size_divisibility=1024).tensor
    assert padded.shape == (1, 3, 1024, 1024)
    x = _vit_input_shape(model, lambda: model.backbone(padded))
    assert x.shape == (1, 3, 1024, 1024) and torch.equal(x, padded)


def test_coco_b_param_groups_decay_the_channels_first_layernorms_as_vitdet(coco_b):
    """ViTDet's "LN" of the pyramid and heads is detectron2's plain-Module LayerNorm: not a norm type for the
    optimizer, so weight decay 0.1; the ViT blocks' nn.LayerNorms keep weight_decay_norm = 0."""
    cfg, model = coco_b
    cfg.optimizer.params.model = model
    groups = instantiate(cfg.optimizer).param_groups
    wd_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    checked = 0
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if name == "pos_embed":
                expected = 0.0  # the config's override
            elif isinstance(module, nn.LayerNorm) and not isinstance(module, LayerNorm2d):
                expected = 0.0  # weight_decay_norm
            else:
                expected = 0.1
            assert wd_of[id(p)] == expected, f"{module_name}.{name}"
            checked += 1
    assert checked == len(list(model.parameters()))
    assert wd_of[id(model.backbone.simfp_2[1].weight)] == 0.1  # the pyramid's first LN
    assert wd_of[id(model.backbone.simfp_5[-1].norm.bias)] == 0.1  # an output conv's LN
    assert wd_of[id(model.roi_heads.box_head.conv1.norm.weight)] == 0.1
    assert wd_of[id(model.roi_heads.mask_head.mask_fcn1.norm.weight)] == 0.1
    assert wd_of[id(model.backbone.net.blocks[0].norm1.weight)] == 0.0


def test_lsj_keeps_the_crop_size_as_the_image_size():
    """LSJ crops without padding: an image that the resize leaves smaller than the square stays its size, and
    so does the recorded image size that proposals are clipped to."""
    cfg = LazyConfig.load(SMOKE)
    mapper_cfg = cfg.dataloader.train.mapper
    resize, crop = mapper_cfg.augmentations[1:]
    resize.min_scale = resize.max_scale = 0.5  # 64 px images -> 32 px, inside the 64 px crop
    assert crop.pad is False and cfg.model.backbone.square_pad == 64
    mapper = instantiate(mapper_cfg)
    record = DatasetCatalog.get(cfg.dataloader.train.dataset.names)[0]
    out = mapper(record)
    assert out["image"].shape[1:] == (32, 32)
    assert out["instances"].image_size == (32, 32)


def test_smoke_model_predicts_in_the_original_image_coordinates():
    """Padding to the square (bottom and right) moves no pixel: detections are clipped to the original image."""
    cfg = LazyConfig.load(SMOKE)
    torch.manual_seed(0)
    model = instantiate(cfg.model).eval()
    model.proposal_generator.post_nms_topk = (20, 20)
    model.roi_heads.box_predictor.test_score_thresh = 0.0  # random weights: keep every detection
    image = torch.rand(3, 32, 64) * 255  # square_pad 64: padded to 64 x 64 at the bottom (v0.6 alone: none)
    x = _vit_input_shape(model, lambda: model([{"image": image}]))
    assert x.shape == (1, 3, 64, 64)
    with torch.no_grad():
        instances = model([{"image": image}])[0]["instances"]
    assert instances.image_size == (32, 64) and len(instances) > 0
    boxes = instances.pred_boxes.tensor
    assert (boxes[:, [1, 3]] <= 32).all() and (boxes[:, [0, 2]] <= 64).all() and (boxes >= 0).all()
    assert instances.pred_masks.shape[-2:] == (32, 64)


def test_coco_config_builds_a_vitdet_b_mask_rcnn_with_layer_decay(coco_b):
    cfg, model = coco_b
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


def test_a_mask_rcnn_step_under_bf16_autocast_on_cpu():
    """A training step of the smoke Mask R-CNN (ViTDet backbone, sdpa attention, RoIAlign, mask head) under bf16
    autocast, as CPU autocast: the ViT runs in bf16, every loss and gradient is finite. A CPU stand-in for mixed
    precision on the GPU (issue 25), where `tools/train_net.py` runs detectron2's AMPTrainer."""
    cfg = LazyConfig.load(SMOKE)
    torch.manual_seed(0)
    model = instantiate(cfg.model).train()
    batch = next(iter(instantiate(cfg.dataloader.train)))
    dtypes = set()
    model.backbone.net.blocks[0].attn.qkv.register_forward_hook(lambda mod, inputs, out: dtypes.add(out.dtype))
    with EventStorage(0), torch.autocast("cpu", dtype=torch.bfloat16):  # the heads log to an EventStorage
        losses = model(batch)
    total = sum(losses.values())
    total.backward()
    assert dtypes == {torch.bfloat16}
    assert all(torch.isfinite(v) for v in losses.values()), losses
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
