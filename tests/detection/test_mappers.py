"""The detection mappers (`detection.mappers`): images read as pretraining reads them (a 16-bit PNG is not white),
and detectron2's `DatasetMapper` behaviour unchanged for ordinary 8-bit images."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import detection  # noqa: F401  (compat layer before detectron2)
from detection.mappers import DatasetMapper, read_image
from detectron2.config import LazyConfig, instantiate
from detectron2.data import DatasetMapper as D2DatasetMapper
from detectron2.structures import BoxMode
from pretrain.data.images import open_rgb
from pretrain.errors import DataError

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ["configs/demo/mask_rcnn_vit_smoke_builtin.py", "configs/demo/mask_rcnn_vit_tiny_builtin.py",
           "configs/COCO/mask_rcnn_vitdet_b_100ep.py", "configs/COCO/cascade_mask_rcnn_vitdet_b_100ep.py"]


def _deep_png(path: Path, size: int = 64) -> Path:
    """A 16-bit grey PNG whose grey level rises along x from 0 to 65535."""
    ramp = np.tile(np.linspace(0, 65535, size).round().astype(np.uint16), (size, 1))
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I;16")
    return path


def _expected(path: Path, image_format: str) -> np.ndarray:
    rgb = np.asarray(open_rgb(path))
    return rgb[:, :, ::-1] if image_format == "BGR" else rgb


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("image_format", ["RGB", "BGR"])
def test_a_16_bit_png_reaches_the_model_as_open_rgb_reads_it(config, image_format, tmp_path):
    """Through the config's own train and test mappers (augmentations off, so that pixels compare), in either
    channel order; detectron2's `read_image` would clip 63 of its 64 columns to white."""
    png = _deep_png(tmp_path / "deep.png")
    cfg = LazyConfig.load(str(ROOT / config))
    square = [8.0, 8.0, 40.0, 8.0, 40.0, 40.0, 8.0, 40.0]
    record = {"file_name": str(png), "height": 64, "width": 64, "image_id": 1,
              "annotations": [{"bbox": [8.0, 8.0, 32.0, 32.0], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0,
                               "segmentation": [square], "iscrowd": 0}]}
    for split in ("train", "test"):
        node = cfg.dataloader[split].mapper
        node.augmentations, node.image_format = [], image_format
        image = instantiate(node)(record)["image"]
        assert image.dtype == torch.uint8
        np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), _expected(png, image_format))
        assert image.float().mean() < 140  # the ramp's mean is 127.5, not white


def test_read_image_converts_as_open_rgb_and_keeps_detectron2s_formats(tmp_path):
    png = _deep_png(tmp_path / "deep.png")
    np.testing.assert_array_equal(read_image(png, "RGB"), _expected(png, "RGB"))
    assert read_image(png, "L").shape == (64, 64, 1) and read_image(png, "L")[0, -1, 0] == 255


def _eight_bit_images(folder: Path) -> list[Path]:
    """A colour JPEG, the same JPEG stored sideways with an EXIF orientation, an RGBA PNG and a palette PNG."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    pixels[:, :32, 0] = 255  # a red left half: a swapped channel order or an unrotated image shows
    jpg, exif_jpg, rgba, palette = (folder / n for n in ("a.jpg", "exif.jpg", "rgba.png", "p.png"))
    Image.fromarray(pixels).save(jpg, quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(np.rot90(pixels).copy()).save(exif_jpg, quality=95, exif=exif)
    Image.fromarray(np.dstack([pixels, np.full((48, 64), 200, np.uint8)])).save(rgba)
    Image.fromarray(pixels).quantize(16).save(palette)
    return [jpg, exif_jpg, rgba, palette]


@pytest.mark.parametrize("image_format", ["RGB", "BGR"])
@pytest.mark.parametrize("train", [True, False])
def test_8_bit_images_map_exactly_as_detectron2s_mapper(image_format, train, tmp_path):
    """The smoke config's LSJ (train) or resize (test), with masks and re-fitted boxes: same random draws, same
    image and instances as detectron2's own `DatasetMapper` for every ordinary 8-bit image kind."""
    cfg = LazyConfig.load(str(ROOT / CONFIGS[0]))
    node = cfg.dataloader.train.mapper if train else cfg.dataloader.test.mapper
    kwargs = dict(is_train=train, augmentations=[instantiate(a) for a in node.augmentations], image_format=image_format)
    if train:
        kwargs.update(use_instance_mask=True, recompute_boxes=True)
    ours, theirs = DatasetMapper(**kwargs), D2DatasetMapper(**kwargs)
    square = [8.0, 8.0, 40.0, 8.0, 40.0, 40.0, 8.0, 40.0]
    for path in _eight_bit_images(tmp_path):
        # 48 x 64 as displayed: the EXIF image is stored 64 x 48 and turned upright by both readers
        record = {"file_name": str(path), "height": 48, "width": 64, "image_id": 1,
                  "annotations": [{"bbox": [8.0, 8.0, 32.0, 32.0], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0,
                                   "segmentation": [square], "iscrowd": 0}]}
        for seed in range(3):
            np.random.seed(seed)
            a = ours(record)
            np.random.seed(seed)
            b = theirs(record)
            assert a.keys() == b.keys()
            torch.testing.assert_close(a["image"], b["image"], rtol=0, atol=0)
            if train:
                x, y = a["instances"], b["instances"]
                torch.testing.assert_close(x.gt_boxes.tensor, y.gt_boxes.tensor, rtol=0, atol=0)
                torch.testing.assert_close(x.gt_classes, y.gt_classes, rtol=0, atol=0)
                for px, py in zip(x.gt_masks.polygons, y.gt_masks.polygons, strict=True):
                    for qx, qy in zip(px, py, strict=True):
                        np.testing.assert_array_equal(qx, qy)
    upright = read_image(tmp_path / "exif.jpg", "RGB")
    assert upright.shape == (48, 64, 3)
    assert upright[:, :32, 0].mean() > 200 > upright[:, 32:, 0].mean()  # the red half on the left: turned upright


def test_an_object_without_a_mask_for_a_mask_model_is_one_line(tmp_path):
    """A set registered without `--dataset` (so not checked for masks up front) whose objects have no masks."""
    Image.new("RGB", (64, 48)).save(tmp_path / "a.png")
    record = {"file_name": str(tmp_path / "a.png"), "height": 48, "width": 64, "image_id": 1,
              "annotations": [{"bbox": [8.0, 8.0, 32.0, 32.0], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0,
                               "iscrowd": 0}]}
    mapper = DatasetMapper(is_train=True, augmentations=[], image_format="RGB", use_instance_mask=True,
                           recompute_boxes=True)
    with pytest.raises(DataError, match="has no mask") as e:
        mapper(record)
    assert "\n" not in str(e.value)
    boxes_only = DatasetMapper(is_train=True, augmentations=[], image_format="RGB")
    assert boxes_only(record)["instances"].gt_boxes.tensor.tolist() == [[8.0, 8.0, 40.0, 40.0]]
