"""Detection datasets (`detection.datasets`): the built-in shapes set (deterministic, valid COCO), dataset
registration, missing-file errors, and annotation checks (bad boxes and polygons dropped or clipped with one warning,
bad annotation files as one-line errors)."""
import contextlib
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

import detection  # noqa: F401  (compat layer before detectron2)
import detectron2.data.transforms as T
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from pretrain.data.images import render_builtin_image
from pretrain.errors import DataError
from pretrain.data.synthetic import render_shapes_image, shapes_rng
from detection.datasets import (
    SHAPE_CATEGORIES,
    build_builtin_shapes,
    check_dataset,
    clean_annotations,
    load_checked_coco_json,
    register_builtin_shapes,
    register_coco_json,
    write_builtin_shapes,
)
from detection.mappers import BitmaskDatasetMapper


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shapes") / "seed0"
    write_builtin_shapes(folder, num_train=6, num_val=3, image_size=64, seed=0)
    return folder


def _load(path: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def test_same_seed_same_bytes_other_seed_other_bytes(shapes, tmp_path):
    write_builtin_shapes(tmp_path / "again", num_train=6, num_val=3, image_size=64, seed=0)
    write_builtin_shapes(tmp_path / "other", num_train=6, num_val=3, image_size=64, seed=1)
    reference = _digest(shapes)
    assert _digest(tmp_path / "again") == reference
    other = _digest(tmp_path / "other")
    assert other.keys() == reference.keys()
    assert other["annotations/train.json"] != reference["annotations/train.json"]
    assert other["train/000000.jpg"] != reference["train/000000.jpg"]


@pytest.mark.parametrize("split", ["train", "val"])
def test_valid_coco_with_polygons_inside_the_image(shapes, split):
    coco = _load(shapes / "annotations" / f"{split}.json")
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(SHAPE_CATEGORIES)
    assert len(coco.getAnnIds()) >= len(coco.getImgIds())  # every image has at least one shape
    used = {a["category_id"] for a in coco.dataset["annotations"]}
    assert len(used) > 1
    for ann in coco.dataset["annotations"]:
        img = coco.imgs[ann["image_id"]]
        assert (shapes / img["file_name"]).is_file()
        poly = np.asarray(ann["segmentation"][0]).reshape(-1, 2)
        assert len(poly) >= 3
        assert poly.min() >= 0 and poly[:, 0].max() <= img["width"] - 1 and poly[:, 1].max() <= img["height"] - 1
        assert ann["area"] > 0
        mask = coco.annToMask(ann)
        assert mask.sum() == pytest.approx(ann["area"], rel=0.05)
        x, y, w, h = ann["bbox"]
        ys, xs = np.nonzero(mask)
        assert x - 1 <= xs.min() and xs.max() <= x + w + 1 and y - 1 <= ys.min() and ys.max() <= y + h + 1


def test_train_and_val_are_disjoint(shapes):
    train, val = (json.loads((shapes / "annotations" / f"{s}.json").read_text()) for s in ("train", "val"))
    assert not {i["id"] for i in train["images"]} & {i["id"] for i in val["images"]}
    assert not {i["file_name"] for i in train["images"]} & {i["file_name"] for i in val["images"]}
    digests = _digest(shapes)
    train_jpgs = {v for k, v in digests.items() if k.startswith("train/")}
    val_jpgs = {v for k, v in digests.items() if k.startswith("val/")}
    assert len(train_jpgs) == 6 and len(val_jpgs) == 3 and not train_jpgs & val_jpgs


def test_pretraining_images_come_from_the_same_renderer_on_another_stream(shapes):
    # one renderer for both packages; pretraining's built-in images never repeat a detection image
    a = [render_builtin_image(i, size=64, seed=0) for i in range(2)]
    assert a[0].shape == (64, 64, 3) and a[0].dtype == np.uint8
    assert np.array_equal(a[0], render_shapes_image(shapes_rng(0, "pretrain", 0), 64)[0])
    assert not np.array_equal(a[0], a[1]) and not np.array_equal(a[0], render_builtin_image(0, size=64, seed=4))
    train0 = render_shapes_image(shapes_rng(0, "train", 0), 64)[0]
    written = np.asarray(Image.open(shapes / "train" / "000000.jpg").convert("RGB")).astype(float)
    # the written split is that stream, up to JPEG (which smooths the pixel noise): ~9 grey levels off, not ~60
    assert np.abs(written - train0).mean() < 15 and np.abs(written - a[0]).mean() > 40


def test_registered_builtin_set_is_rendered_once_and_loads(tmp_path):
    train, val = register_builtin_shapes(prefix="test_shapes_reg", num_train=3, num_val=2, image_size=48,
                                         root=tmp_path)
    assert (train, val) == ("test_shapes_reg_train", "test_shapes_reg_val")
    check_dataset(val)
    folder = build_builtin_shapes(num_train=3, num_val=2, image_size=48, root=tmp_path)
    stamp = (folder / "annotations" / "val.json").stat().st_mtime_ns
    dicts = DatasetCatalog.get(val)
    assert len(dicts) == 2 and all(d["annotations"] for d in dicts)
    assert (folder / "annotations" / "val.json").stat().st_mtime_ns == stamp  # reused, not rewritten
    assert MetadataCatalog.get(train).thing_classes == list(SHAPE_CATEGORIES)
    # same parameters: a no-op; other parameters under the same names: refused
    assert register_builtin_shapes(prefix="test_shapes_reg", num_train=3, num_val=2, image_size=48,
                                   root=tmp_path) == (train, val)
    with pytest.raises(DataError, match="already registered"):
        register_builtin_shapes(prefix="test_shapes_reg", num_train=4, num_val=2, image_size=48, root=tmp_path)


def test_missing_coco_json_names_the_path_and_the_variable(tmp_path):
    # registered like detectron2's coco_2017_* names, whose files live under $DETECTRON2_DATASETS/coco
    json_file = tmp_path / "coco" / "annotations" / "instances_val2017.json"
    DatasetCatalog.register("coco_test_missing", lambda: [])
    MetadataCatalog.get("coco_test_missing").set(json_file=str(json_file), image_root=str(tmp_path))
    with pytest.raises(DataError) as err:
        check_dataset("coco_test_missing")
    message = str(err.value)
    assert str(json_file) in message and "DETECTRON2_DATASETS" in message and "\n" not in message


def test_register_coco_json_refuses_missing_files(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "nope.json")):
        register_coco_json("test_missing_json", tmp_path / "nope.json", tmp_path)
    (tmp_path / "a.json").write_text("{}")
    with pytest.raises(DataError, match="image folder"):
        register_coco_json("test_missing_root", tmp_path / "a.json", tmp_path / "images")
    with pytest.raises(DataError, match="not registered"):
        check_dataset("test_never_registered")


def test_bitmask_mapper_crops_without_shapely(shapes):
    record = load_coco_json(str(shapes / "annotations" / "train.json"), str(shapes))[0]
    mapper = BitmaskDatasetMapper(True, augmentations=[T.ResizeScale(1.5, 1.5, 64, 64), T.FixedSizeCrop((64, 64))],
                                  image_format="RGB", use_instance_mask=True, recompute_boxes=True)
    out = mapper(record)
    assert out["image"].shape == (3, 64, 64)
    inst = out["instances"]
    masks = inst.gt_masks.tensor
    assert masks.shape[1:] == (64, 64) and len(inst) >= 1 and masks.flatten(1).any(1).all()
    # boxes were recomputed from the cropped masks
    assert np.allclose(inst.gt_boxes.tensor.numpy(), inst.gt_masks.get_bounding_boxes().tensor.numpy())


# ------------------------------------------------------------------------------------------ annotation checks

def _write_coco(tmp_path: Path, annotations: list[dict], size=(64, 64)) -> tuple[Path, Path]:
    Image.fromarray(render_builtin_image(0, 64)).save(tmp_path / "a.jpg")
    coco = {"images": [{"id": 1, "file_name": "a.jpg", "height": size[0], "width": size[1]}],
            "annotations": [{"id": i + 1, "image_id": 1, "iscrowd": 0, "area": 1.0, **a}
                            for i, a in enumerate(annotations)],
            "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "a.json").write_text(json.dumps(coco))
    return tmp_path / "a.json", tmp_path


def test_bad_boxes_and_polygons_are_dropped_or_clipped_with_one_warning(tmp_path, caplog):
    square = [10, 10, 30, 10, 30, 30, 10, 30]
    anns = [{"category_id": 1, "bbox": [10, 10, 20, 20], "segmentation": [square]},  # fine
            {"category_id": 1, "bbox": [10, 10, -5, 20], "segmentation": [square]},  # negative width
            {"category_id": 1, "bbox": [100, 100, 10, 10], "segmentation": [square]},  # outside the image
            {"category_id": 1, "bbox": [50, 50, 30, 30], "segmentation": [[50, 50, 63, 50, 63, 63, 50, 63]]},  # clipped
            {"category_id": 1, "bbox": [5, 5, 10, 10], "segmentation": [[5, 5, 15, 5, 25, 5]]},  # zero-area polygon
            {"category_id": 1, "bbox": [5, 5, 10, 10], "segmentation": []}]  # empty: crashed training before
    json_file, root = _write_coco(tmp_path, anns)
    with caplog.at_level("WARNING"):
        records = load_checked_coco_json(json_file, root, "test_bad_boxes")
    kept = records[0]["annotations"]
    assert len(kept) == 2 and kept[1]["bbox"] == [50, 50, 14, 14]
    warnings = [r.message for r in caplog.records if "test_bad_boxes" in r.getMessage()]
    assert len(warnings) == 1
    text = caplog.records[-1].getMessage()
    assert "dropped 4 annotations" in text and "1 of non-positive size" in text and "1 outside the image" in text \
        and "2 with no usable mask polygon" in text and "clipped 1 boxes" in text
    assert clean_annotations([{"width": 64, "height": 64, "annotations": []}], "empty") == [
        {"width": 64, "height": 64, "annotations": []}]


@pytest.mark.parametrize("case, message", [
    ("unknown_category", "has category id 7"),
    ("broken_json", "is not valid JSON"),
])
def test_bad_annotation_files_are_one_line_errors(case, message, tmp_path):
    json_file, root = _write_coco(tmp_path, [{"category_id": 7 if case == "unknown_category" else 1,
                                              "bbox": [1, 1, 5, 5], "segmentation": [[1, 1, 6, 1, 6, 6]]}])
    if case == "broken_json":
        json_file.write_text(json_file.read_text()[:-10])
    with pytest.raises(DataError, match=message) as e:
        load_checked_coco_json(json_file, root, f"test_{case}")
    assert "\n" not in str(e.value)
