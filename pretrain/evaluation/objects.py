"""Labelled images for frozen-feature evaluation: the objects of a COCO-format set cropped to the encoder's input
(`ObjectCrops`), or an ImageFolder split with MAE's evaluation transform (`image_folder`)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision import datasets, transforms

from ..data.images import IMAGENET_MEAN, IMAGENET_STD, open_rgb
from ..errors import DataError

__all__ = ["read_coco_objects", "object_boxes", "ObjectCrops", "image_folder"]


def _normalize() -> transforms.Normalize:
    return transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)


def read_coco_objects(json_file: str | Path) -> tuple[list[str], list[tuple[str, tuple[float, ...], int]]]:
    """The class names of a COCO-format json, in ascending category id, and its objects as (image file name, COCO
    box (x, y, w, h), category index); crowd annotations and boxes under one pixel are skipped.

    Raises:
        DataError: missing or broken json, no annotations, or an annotation of an unknown category or image.
    """
    json_file = Path(json_file)
    if not json_file.is_file():
        raise DataError(f"annotation file {json_file} not found; give a COCO-format json")
    try:
        coco = json.loads(json_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{json_file} is not valid JSON ({e}); give a COCO-format json") from None
    if not isinstance(coco, dict) or not all(k in coco for k in ("images", "annotations", "categories")):
        raise DataError(f"{json_file} is not a COCO instances json (needs images, annotations, categories)")
    cat_ids = sorted(c["id"] for c in coco["categories"])
    classes = [next(c["name"] for c in coco["categories"] if c["id"] == i) for i in cat_ids]
    index_of = {cid: i for i, cid in enumerate(cat_ids)}
    files = {im["id"]: im["file_name"] for im in coco["images"]}
    objects = []
    for ann in coco["annotations"]:
        if ann.get("iscrowd", 0):
            continue
        if ann["category_id"] not in index_of:
            raise DataError(f"{json_file}: annotation {ann.get('id')} has category {ann['category_id']}, which is "
                            "not in 'categories'; fix the json")
        if ann["image_id"] not in files:
            raise DataError(f"{json_file}: annotation {ann.get('id')} refers to image {ann['image_id']}, which "
                            "is not in 'images'; fix the json")
        x, y, w, h = ann["bbox"]
        if w >= 1 and h >= 1:
            objects.append((files[ann["image_id"]], (x, y, w, h), index_of[ann["category_id"]]))
    if not objects:
        raise DataError(f"{json_file} has no usable object annotations (non-crowd boxes of at least 1 px)")
    return classes, objects


def object_boxes(json_file: str | Path) -> tuple[list[str], list[tuple[str, tuple[int, int, int, int], int]]]:
    """`read_coco_objects` with each box as the pixel box PIL crops, rounded outwards: (x0, y0, x1, y1).

    Raises:
        DataError: as `read_coco_objects`.
    """
    classes, objects = read_coco_objects(json_file)
    return classes, [(file_name, (math.floor(x), math.floor(y), math.ceil(x + w), math.ceil(y + h)), label)
                     for file_name, (x, y, w, h), label in objects]


class ObjectCrops(Dataset):
    """Every ground-truth object of a COCO-format set as (crop, category index), crops resized to `input_size`.

    The crop is the object's box (COCO `bbox`, rounded outwards), resized without keeping the aspect ratio, as
    a detector's RoI features are. Crowd annotations and boxes under one pixel are skipped. Category indices
    follow the json's category ids in ascending order.

    Raises:
        DataError: missing or broken json, no annotations, or an annotation of an unknown category or image.
    """

    def __init__(self, json_file: str | Path, image_root: str | Path, input_size: int) -> None:
        self.image_root = Path(image_root)
        self.classes, self.items = object_boxes(json_file)
        self.transform = transforms.Compose([transforms.Resize((input_size, input_size),
                                                               interpolation=transforms.InterpolationMode.BICUBIC),
                                             transforms.ToTensor(), _normalize()])
        self.labels = torch.tensor([c for _, _, c in self.items])

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        file_name, box, label = self.items[index]
        path = self.image_root / file_name
        try:
            crop = open_rgb(path).crop(box)
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read {path} ({e}); check the image folder") from None
        return self.transform(crop), label


def image_folder(root: str | Path, input_size: int) -> datasets.ImageFolder:
    """An ImageFolder split with MAE's evaluation transform: bicubic resize to input_size / 0.875, centre crop.

    Raises:
        DataError: the folder is missing or holds no class folders of images (labels come from the folders).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root} not found; an ImageFolder split holds <class>/<image> folders")
    tf = transforms.Compose([transforms.Resize(int(input_size / 0.875), interpolation=transforms.InterpolationMode.BICUBIC),
                             transforms.CenterCrop(input_size), transforms.ToTensor(), _normalize()])
    try:
        folder = datasets.ImageFolder(str(root), tf)
    except FileNotFoundError as e:
        raise DataError(f"{root} has no labelled images ({e}); the probe needs <class>/<image> folders") from None
    folder.labels = torch.tensor(folder.targets)
    return folder
