"""The objects of a COCO-format detection set as an ImageFolder (`<split>/<class>/<n>.png`): labelled images for
fine-tuning a classifier on the same objects the detector and the frozen-feature probe see.

`object_folder(train, val, out)` writes two sets' crops (each ground-truth box rounded outwards, as
`pretrain.evaluation.objects.ObjectCrops` crops them, at their own size) once, atomically, and reuses them;
`builtin_object_folder()` does it for the demo's built-in shapes set.
"""
from __future__ import annotations

from pathlib import Path

from detection.datasets import dataset_files, register_builtin_shapes
from pretrain.data.images import open_rgb
from pretrain.errors import DataError
from pretrain.files import build_folder_once
from pretrain.evaluation.objects import object_boxes

__all__ = ["object_folder", "builtin_object_folder"]


def _write_split(json_file: str | Path, image_root: str | Path, out: Path) -> None:
    classes, boxes = object_boxes(json_file)
    for name in classes:
        (out / name).mkdir(parents=True)
    for n, (file_name, box, label) in enumerate(boxes):
        path = Path(image_root) / file_name
        try:
            image = open_rgb(path)
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read {path} ({e}); check the image folder") from None
        image.crop(box).save(out / classes[label] / f"{n:06d}.png")


def object_folder(train: tuple[str, str], val: tuple[str, str], out: str | Path) -> Path:
    """Write the crops of `train` and `val` ((json, image folder) each) under `out/{train,val}/` unless done
    (`pretrain.files.build_folder_once`: torchrun's ranks may all ask for it at once).

    Raises:
        DataError: as `read_coco_objects` (missing or broken json, no objects), or an unreadable image.
    """
    def write(staging: Path) -> None:
        for split, (json_file, image_root) in (("train", train), ("val", val)):
            _write_split(json_file, image_root, staging / split)
    return build_folder_once(out, write)


def builtin_object_folder(image_size: int = 192) -> Path:
    """The objects (4 classes) of the demo's detection set (seed 0, 512 train and 64 val images of `image_size`
    px), next to the set in the cache: `.../objects/{train,val}`."""
    train_name, val_name = register_builtin_shapes(f"builtin_objects_px{image_size}", seed=0, num_train=512,
                                                   num_val=64, image_size=image_size)
    train, val = dataset_files(train_name), dataset_files(val_name)
    return object_folder(train, val, Path(train[1]) / "objects")
