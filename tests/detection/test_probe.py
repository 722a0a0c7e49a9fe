"""The detector-view probe: object features read through a config's test path and its ViTDet backbone."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detection.probe import DetectorObjects, build_detector, detector_features, run_detector_probe
from detectron2.config import instantiate
from pretrain.data.images import open_rgb
from pretrain.errors import ConfigError
from pretrain.models import create_model
from workflows import cli

SMOKE = str(Path(__file__).resolve().parents[2] / "configs/demo/mask_rcnn_vit_smoke_builtin.py")


def _one_image_set(folder: Path, size: int, boxes: list[list[float]]) -> tuple[str, str]:
    """A COCO json of one random image with `boxes` (x, y, w, h), categories 1 and 2 alternating."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / "a.png")
    coco = {"images": [{"id": 1, "file_name": "a.png", "height": size, "width": size}],
            "annotations": [{"id": i + 1, "image_id": 1, "category_id": 1 + i % 2, "bbox": b, "area": b[2] * b[3],
                             "iscrowd": 0} for i, b in enumerate(boxes)],
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    (folder / "set.json").write_text(json.dumps(coco))
    return str(folder / "set.json"), str(folder)


def test_roi_features_of_a_box_on_the_patch_grid_are_its_cells(tmp_path):
    """A 32 x 32 box at (16, 16) covers cells 1..2 of the stride-16 map: RoIAligned 2 x 2 (aligned, one sample a
    bin, at its centre) it is exactly those cells of the last block's output, and of p4 (stride 16)."""
    model, cfg = build_detector(SMOKE, None)
    augs = [instantiate(a) for a in cfg.dataloader.test.mapper.augmentations]
    objects = DetectorObjects(*_one_image_set(tmp_path / "set", 64, [[16, 16, 32, 32]]), augs, "RGB")
    image, boxes, labels = objects[0]
    assert boxes.tolist() == [[16.0, 16.0, 48.0, 48.0]] and labels.tolist() == [0]
    with torch.no_grad():
        x = model.preprocess_image([{"image": image}]).tensor
        last = model.backbone.net(x)["last_feat"]  # (1, C, 4, 4); the 64 px input is already the square pad
        p4 = model.backbone(x)["p4"]
    feats, health = detector_features(model, objects, "block:-1", roi_size=2)
    torch.testing.assert_close(feats[0], last[0, :, 1:3, 1:3].flatten())
    torch.testing.assert_close(detector_features(model, objects, "p4", roi_size=2)[0][0], p4[0, :, 1:3, 1:3].flatten())
    assert len(health) == len(model.backbone.net.blocks) and health[-1]["token_norm"] > 0


def test_boxes_follow_the_test_time_resize(tmp_path):
    """A 128 px image reaches the smoke config's 64 px test size: its box is halved."""
    _, cfg = build_detector(SMOKE, None)
    augs = [instantiate(a) for a in cfg.dataloader.test.mapper.augmentations]
    image, boxes, _ = DetectorObjects(*_one_image_set(tmp_path / "set", 128, [[8, 16, 64, 32]]), augs, "RGB")[0]
    assert tuple(image.shape) == (3, 64, 64) and boxes.tolist() == [[4.0, 8.0, 36.0, 24.0]]


@pytest.mark.parametrize("image_format", ["RGB", "BGR"])
def test_a_16_bit_image_is_read_as_open_rgb_reads_it(image_format, tmp_path):
    """The detector view reads images as training does (`detection.mappers.read_image`), not clipped to white."""
    json_file, root = _one_image_set(tmp_path / "set", 64, [[16, 16, 32, 32]])
    ramp = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (64, 1))
    Image.fromarray(ramp).save(Path(root) / "a.png")
    image = DetectorObjects(json_file, root, [], image_format)[0][0].permute(1, 2, 0).numpy()
    expected = np.asarray(open_rgb(Path(root) / "a.png"))
    np.testing.assert_array_equal(image, expected[:, :, ::-1] if image_format == "BGR" else expected)


def test_a_block_or_level_that_does_not_exist_is_refused(tmp_path):
    files = _one_image_set(tmp_path / "set", 64, [[16, 16, 32, 32]])
    for source, message in (("block:7", "outside the ViT's 2 blocks"), ("p9", "the pyramid has p2")):
        with pytest.raises(ConfigError, match=message):
            run_detector_probe(None, SMOKE, files, files, source=source, epochs=1)


def test_cli_detector_view_writes_json_and_one_line(probe_shapes, tmp_path, capsys, tiny_checkpoint):
    ckpt = tiny_checkpoint(tmp_path / "m.pth")  # a pretraining file, converted for the smoke ViT on the fly
    args = [str(ckpt), "--view", "detector", "--config-file", SMOKE, "--dataset", "dv_train",
            str(probe_shapes / "annotations" / "train.json"), str(probe_shapes), "--dataset", "dv_val",
            str(probe_shapes / "annotations" / "val.json"), str(probe_shapes), "--train", "dv_train", "--val", "dv_val",
            "--k", "3", "--epochs", "2", "--output", str(tmp_path / "probe.json")]
    assert cli.probe(args) == 0
    captured = capsys.readouterr()
    out = captured.out.strip().splitlines()
    assert len(out) == 1 and "detector view: block:-1 RoIAligned 4 x 4" in out[0]
    assert "feature health of the last block: std " in captured.err
    result = json.loads((tmp_path / "probe.json").read_text())
    n_train = len(json.loads((probe_shapes / "annotations" / "train.json").read_text())["annotations"])
    assert result["view"] == "detector" and result["train_samples"] == n_train
    assert result["feature_dim"] == 32 * 4 * 4 and len(result["feature_health"]) == 2


def test_cli_detector_view_states_the_chance_levels(counted_objects, tmp_path, capsys, tiny_checkpoint):
    ckpt = tiny_checkpoint(tmp_path / "m.pth")
    args = [str(ckpt), "--view", "detector", "--config-file", SMOKE, "--dataset", "dv_counted_t",
            str(counted_objects / "train.json"), str(counted_objects), "--dataset", "dv_counted_v",
            str(counted_objects / "val.json"), str(counted_objects), "--train", "dv_counted_t", "--val", "dv_counted_v",
            "--k", "3", "--epochs", "2", "--output", str(tmp_path / "probe.json")]
    assert cli.probe(args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "(chance: 1/4 classes 0.250, majority class 'a' 0.400; detector view" in out[0]
    assert json.loads((tmp_path / "probe.json").read_text())["chance"] == {"uniform": 0.25, "majority": 0.4,
                                                                           "majority_class": 0}


@pytest.mark.parametrize("case, message", [
    ("not_weights", "is corrupt or not a torch checkpoint (no pickle torch can read)"),
    ("wider", "does not match the target config"),
    ("no_config", "--view detector needs --config-file"),
])
def test_a_wrong_checkpoint_or_missing_config_is_one_line(case, message, probe_shapes, tmp_path, tiny_checkpoint,
                                                          tiny_cfg, one_error_line):
    ckpt = tmp_path / "m.pth"
    if case == "not_weights":
        ckpt.write_text("not a checkpoint")
    elif case == "wider":  # a 48-wide encoder for the 32-wide smoke ViT
        cfg = tiny_cfg(tmp_path)
        torch.save({"model": create_model({**cfg, "model_kwargs": {**cfg["model_kwargs"], "embed_dim": 48}})
                    .state_dict()}, ckpt)
    else:
        tiny_checkpoint(ckpt)
    args = [str(ckpt), "--view", "detector"] + ([] if case == "no_config" else ["--config-file", SMOKE])
    assert cli.probe(args) == 2
    one_error_line(message)
