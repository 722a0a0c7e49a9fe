"""Detection datasets: COCO 2017, any COCO-format json, and a generated built-in shapes set.

Three ways to name a dataset in a config's `dataloader.*.dataset.names`:

- `coco_2017_train`, `coco_2017_val`: detectron2's built-in names, read from
  `$DETECTRON2_DATASETS/coco/{annotations/instances_*2017.json,train2017,val2017}`.
- Any COCO-format json + image folder: `register_coco_json(name, json_file, image_root)`;
  `tools/train_net.py --dataset NAME JSON IMAGE_ROOT` calls it before the config is built, then e.g.
  `dataloader.train.dataset.names=NAME` selects it.
- `builtin_shapes_train`, `builtin_shapes_val`: `register_builtin_shapes()` renders circles, squares,
  triangles and stars with polygon masks on noisy textured backgrounds (`pretrain.data.synthetic`, the renderer of
  pretraining's built-in images too, on other random streams), deterministically from a seed,
  into a cache folder (`$CROSSMAE_VITDET_CACHE` or `~/.cache/crossmae-vitdet`, under
  `builtin_shapes/seed{S}_n{train}-{val}_px{size}`) the first time it is read, then reuses it.
  Configs that use it register it (with their own size); tools/train_net.py registers the defaults otherwise.

`check_dataset(name)` turns a missing json or image folder into a one-line error naming the path, and
builds a built-in set whose files are not there yet; `dataset_files(name)` gives a registered set's json and
image folder (what the object probe and the demo read); `count_annotations(name)` counts a registered json's objects
and masks (train_net trains a box-only model on a set without masks, and refuses a set without annotations).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import pycocotools.mask as mask_util
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from pretrain.errors import DataError
from pretrain.files import build_folder_once
from pretrain.data.synthetic import render_shapes_image, SHAPE_CATEGORIES, shapes_rng

from .mappers import BitmaskDatasetMapper  # noqa: F401  (its home before detection.mappers; configs name it)

__all__ = ["SHAPE_CATEGORIES", "builtin_shapes_dir", "write_builtin_shapes", "build_builtin_shapes",
           "register_builtin_shapes", "register_coco_json", "read_coco_json", "load_checked_coco_json",
           "AnnotationCount", "count_annotations", "check_dataset", "dataset_files"]

_SPLITS = ("train", "val")
logger = logging.getLogger(__name__)
_DONE = "DONE"


def builtin_shapes_dir(seed: int = 0, num_train: int = 512, num_val: int = 64, image_size: int = 256,
                       root: str | os.PathLike | None = None) -> Path:
    """Folder that holds (or will hold) the built-in set with these parameters."""
    if root is None:
        cache = os.environ.get("CROSSMAE_VITDET_CACHE") or Path.home() / ".cache" / "crossmae-vitdet"
        root = Path(cache) / "builtin_shapes"
    return Path(root) / f"seed{seed}_n{num_train}-{num_val}_px{image_size}"


def _coco_split(folder: Path, split: str, count: int, first_id: int, image_size: int, seed: int) -> dict[str, Any]:
    """Render one split's images into `folder/split/` and return its COCO dict."""
    (folder / split).mkdir(parents=True)
    images, annotations = [], []
    for index in range(count):
        # Streams keyed by (seed, split, index): the two splits never share an image.
        image, objects = render_shapes_image(shapes_rng(seed, split, index), image_size)
        image_id, file_name = first_id + index, f"{split}/{index:06d}.jpg"
        cv2.imwrite(str(folder / file_name), image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
        images.append({"id": image_id, "file_name": file_name, "height": image_size, "width": image_size})
        for kind, polygon in objects:
            flat = [round(float(v), 2) for v in polygon.reshape(-1)]
            rle = mask_util.frPyObjects([flat], image_size, image_size)
            x0, y0 = polygon.min(axis=0)
            x1, y1 = polygon.max(axis=0)
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": kind + 1,
                "segmentation": [flat], "area": float(mask_util.area(mask_util.merge(rle))),
                "bbox": [round(float(x0), 2), round(float(y0), 2), round(float(x1 - x0), 2), round(float(y1 - y0), 2)],
                "iscrowd": 0,
            })
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPE_CATEGORIES)]
    info = {"description": f"built-in shapes, seed {seed}, split {split}", "version": "1"}
    return {"info": info, "images": images, "annotations": annotations, "categories": categories}


def write_builtin_shapes(folder: str | os.PathLike, num_train: int, num_val: int, image_size: int,
                         seed: int) -> None:
    """Render both splits into an empty or new `folder`: `{train,val}/*.jpg`, `annotations/{train,val}.json`."""
    folder = Path(folder)
    (folder / "annotations").mkdir(parents=True, exist_ok=True)
    first_id = 1
    for split, count in zip(_SPLITS, (num_train, num_val)):
        coco = _coco_split(folder, split, count, first_id, image_size, seed)
        (folder / "annotations" / f"{split}.json").write_text(json.dumps(coco))
        first_id += count
    (folder / _DONE).write_text("complete\n")


def build_builtin_shapes(seed: int = 0, num_train: int = 512, num_val: int = 64, image_size: int = 256,
                         root: str | os.PathLike | None = None) -> Path:
    """Render the built-in set once (atomically: concurrent workers never see half a set) and return its folder."""
    folder = builtin_shapes_dir(seed, num_train, num_val, image_size, root)
    return build_folder_once(folder, lambda staging: write_builtin_shapes(staging, num_train, num_val, image_size,
                                                                          seed), done=_DONE)


def register_builtin_shapes(prefix: str = "builtin_shapes", seed: int = 0, num_train: int = 512, num_val: int = 64,
                            image_size: int = 256, root: str | os.PathLike | None = None) -> tuple[str, str]:
    """Register `{prefix}_train` and `{prefix}_val`; files are rendered on first read (see `check_dataset`).

    Registering the same names again with the same parameters is a no-op; with other parameters, an error.

    Returns:
        The train and val dataset names.
    """
    folder = builtin_shapes_dir(seed, num_train, num_val, image_size, root)
    # the cache root is resolved now, so later changes of $CROSSMAE_VITDET_CACHE cannot split json and images
    spec = {"seed": seed, "num_train": num_train, "num_val": num_val, "image_size": image_size,
            "root": str(folder.parent)}
    names = []
    for split in _SPLITS:
        name = f"{prefix}_{split}"
        names.append(name)
        if name in DatasetCatalog.list():
            known = MetadataCatalog.get(name).get("builtin_shapes")
            if known != spec:
                raise DataError(f"dataset {name!r} is already registered as {known or 'something else'}, not {spec}; "
                                 "pick another prefix for a second built-in set")
            continue
        json_file, image_root = folder / "annotations" / f"{split}.json", folder

        def load(json_file: Path = json_file, image_root: Path = image_root, name: str = name) -> list[dict]:
            build_builtin_shapes(**spec)
            return load_coco_json(str(json_file), str(image_root), name)

        DatasetCatalog.register(name, load)
        MetadataCatalog.get(name).set(json_file=str(json_file), image_root=str(image_root), evaluator_type="coco",
                                      thing_classes=list(SHAPE_CATEGORIES), builtin_shapes=spec)
    return names[0], names[1]


def register_coco_json(name: str, json_file: str | os.PathLike, image_root: str | os.PathLike) -> None:
    """Register a COCO-format instances json + image folder as `name` (a no-op if already so registered).

    Raises:
        DataError: `json_file` or `image_root` does not exist, or `name` is already registered with other files.
    """
    json_file, image_root = Path(json_file).expanduser(), Path(image_root).expanduser()
    if not json_file.is_file():
        raise DataError(f"dataset {name!r}: annotation file {json_file} not found; pass an existing COCO json")
    if not image_root.is_dir():
        raise DataError(f"dataset {name!r}: image folder {image_root} not found; pass the folder the json's "
                                "file_name entries are relative to")
    if name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name)
        if (meta.get("json_file"), meta.get("image_root")) != (str(json_file), str(image_root)):
            raise DataError(f"dataset {name!r} is already registered with {meta.get('json_file')}; pick another name")
        return
    DatasetCatalog.register(name, lambda: load_checked_coco_json(json_file, image_root, name))
    MetadataCatalog.get(name).set(json_file=str(json_file), image_root=str(image_root), evaluator_type="coco",
                                  checked_json=True)


def _polygon_area(flat: list[float]) -> float:
    xs, ys = flat[0::2], flat[1::2]
    return 0.5 * abs(sum(xs[i] * ys[i - 1] - xs[i - 1] * ys[i] for i in range(len(xs))))


def clean_annotations(records: list[dict], name: str) -> list[dict]:
    """Drop the annotations a detector cannot learn from, clip boxes that stick out, and say so in one line.

    Dropped: boxes of non-positive width or height, boxes wholly outside their image, and (when the set has
    masks) instances whose polygons are all degenerate (under 3 points or zero area), wholly outside the image,
    or missing; boxes partly outside are clipped to the image. Works on detectron2 dataset dicts (XYWH_ABS boxes).
    """
    from detectron2.structures import BoxMode

    counts = {"of non-positive size": 0, "outside the image": 0, "with no usable mask polygon": 0}
    clipped = 0
    has_masks = any("segmentation" in a for r in records for a in r.get("annotations", []))
    for record in records:
        w, h = record["width"], record["height"]
        kept = []
        for ann in record.get("annotations", []):
            x, y, bw, bh = BoxMode.convert(ann["bbox"], ann["bbox_mode"], BoxMode.XYWH_ABS)
            if bw <= 0 or bh <= 0:
                counts["of non-positive size"] += 1
                continue
            x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + bw, float(w)), min(y + bh, float(h))
            if x1 <= x0 or y1 <= y0:
                counts["outside the image"] += 1
                continue
            if (x0, y0, x1, y1) != (x, y, x + bw, y + bh):
                clipped += 1
                ann = {**ann, "bbox": [x0, y0, x1 - x0, y1 - y0], "bbox_mode": BoxMode.XYWH_ABS}
            segm = ann.get("segmentation")
            if has_masks and not isinstance(segm, dict):  # RLE masks are kept as they are
                polys = [p for p in (segm or []) if len(p) >= 6 and _polygon_area(p) > 0
                         and min(p[0::2]) < w and max(p[0::2]) > 0 and min(p[1::2]) < h and max(p[1::2]) > 0]
                if not polys:
                    counts["with no usable mask polygon"] += 1
                    continue
                ann = {**ann, "segmentation": polys}
            kept.append(ann)
        record["annotations"] = kept
    dropped = sum(counts.values())
    if dropped or clipped:
        logger.warning("dataset %s: dropped %d annotations (%s); clipped %d boxes to their image", name, dropped,
                       ", ".join(f"{n} {why}" for why, n in counts.items() if n) or "none", clipped)
    return records


def read_coco_json(json_file: str | os.PathLike, name: str) -> dict[str, Any]:
    """A COCO instances json, checked.

    Raises:
        DataError: the json does not parse, is no COCO instances file, or an annotation names a category or
            image that is not in it.
    """
    try:
        coco = json.loads(Path(json_file).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"dataset {name!r}: {json_file} is not valid JSON ({e}); fix or regenerate the file") from None
    if not isinstance(coco, dict) or not all(k in coco for k in ("images", "annotations", "categories")):
        raise DataError(f"dataset {name!r}: {json_file} is no COCO instances json (needs images, annotations and "
                        "categories)")
    categories, images = {c["id"] for c in coco["categories"]}, {im["id"] for im in coco["images"]}
    for ann in coco["annotations"]:
        if ann.get("category_id") not in categories:
            raise DataError(f"dataset {name!r}: annotation {ann.get('id')} has category id {ann.get('category_id')}, "
                            f"which {json_file} does not list in 'categories'; fix the json")
        if ann.get("image_id") not in images:
            raise DataError(f"dataset {name!r}: annotation {ann.get('id')} refers to image {ann.get('image_id')}, "
                            f"which {json_file} does not list in 'images'; fix the json")
    return coco


def load_checked_coco_json(json_file: str | os.PathLike, image_root: str | os.PathLike, name: str) -> list[dict]:
    """`load_coco_json` after `read_coco_json`'s checks, then `clean_annotations`.

    Raises:
        DataError: as `read_coco_json`.
    """
    read_coco_json(json_file, name)
    return clean_annotations(load_coco_json(str(json_file), str(image_root), name), name)


class AnnotationCount(NamedTuple):
    """The objects of a dataset: annotations that are not crowd regions, and how many of them have a mask."""

    objects: int
    masked: int


def count_annotations(name: str) -> AnnotationCount | None:
    """The objects of a set registered by `register_coco_json`, counted in its json; None for other sets (COCO 2017
    and the built-in shapes, which have a mask on every object, are not read twice).

    Raises:
        DataError: as `read_coco_json`.
    """
    meta = MetadataCatalog.get(name)
    if not meta.get("checked_json", False):
        return None
    objects = [a for a in read_coco_json(meta.json_file, name)["annotations"] if not a.get("iscrowd", 0)]
    return AnnotationCount(len(objects), sum(bool(a.get("segmentation")) for a in objects))


def check_dataset(name: str) -> None:
    """Make sure the files behind a registered dataset exist, rendering a built-in set if needed.

    Raises:
        DataError: `name` is not registered, or its json or image folder is missing (one line, naming the path).
    """
    if name not in DatasetCatalog.list():
        raise DataError(f"dataset {name!r} is not registered; use coco_2017_*, builtin_shapes_*, or register it "
                       "(tools/train_net.py --dataset NAME JSON IMAGE_ROOT)")
    meta = MetadataCatalog.get(name)
    if meta.get("builtin_shapes") is not None:
        build_builtin_shapes(**meta.builtin_shapes)
        return
    hint = "point it at an existing file"
    if name.startswith("coco_"):
        hint = (f"set DETECTRON2_DATASETS to the folder holding coco/ "
                f"(now {os.environ.get('DETECTRON2_DATASETS', 'unset, so ./datasets')})")
    for key in ("json_file", "image_root"):
        path = meta.get(key)
        if path is not None and not os.path.exists(path):
            raise DataError(f"dataset {name!r}: {key} {path} not found; {hint}")


def dataset_files(name: str) -> tuple[str, str]:
    """(json file, image folder) of a registered COCO-format dataset, rendering a built-in set if needed.

    Raises:
        DataError: as `check_dataset`, or the dataset has no json (not COCO-format).
    """
    check_dataset(name)
    meta = MetadataCatalog.get(name)
    if meta.get("json_file") is None or meta.get("image_root") is None:
        raise DataError(f"dataset {name!r} has no COCO json and image folder registered; register it with "
                        "--dataset NAME JSON IMAGE_ROOT")
    return meta.json_file, meta.image_root
