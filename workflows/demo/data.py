"""The demo's data: the detection set's files, its train images as the pretraining set, and its objects decoded
once into memory for the probes along the curves."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from detection.lazyconfig import config_datasets
from pretrain.evaluation.objects import ObjectCrops, read_coco_objects
from pretrain.evaluation.probe import chance_levels

from .presets import DEMO_CONFIGS

__all__ = ["detection_sets", "images_of", "pretraining_folder", "folder_images", "probe_sets", "object_chance"]


def detection_sets(preset: dict) -> dict[str, tuple[str, str]]:
    """{"train": (json, image folder), "val": (...)} of the detection config's datasets, rendered if needed."""
    train, val = config_datasets(DEMO_CONFIGS / preset["detection"]["config"])  # registers the built-in sets
    return {"train": train, "val": val}


def images_of(json_file: str, image_root: str) -> list[Path]:
    """The image files of a COCO-format json, in image-id order."""
    coco = json.loads(Path(json_file).read_text())
    return [Path(image_root) / im["file_name"] for im in sorted(coco["images"], key=lambda im: im["id"])]


def pretraining_folder(sets: dict[str, tuple[str, str]], out: Path) -> Path:
    """A folder of links to the detection train split's images (labels unused): pretraining's `data_path`."""
    folder = out / "pretrain_images"
    if not folder.is_dir():
        staging = out / ".pretrain_images"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for i, path in enumerate(images_of(*sets["train"])):
            (staging / f"{i:06d}{path.suffix}").symlink_to(path.resolve())
        staging.rename(folder)
    return folder


def folder_images(folder: Path) -> list[Path]:
    """The files (and links) of a folder, sorted."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() or p.is_symlink())


def probe_sets(sets: dict[str, tuple[str, str]], input_size: int) -> dict[str, TensorDataset]:
    """The object crops of both splits, decoded once into memory (the curves evaluate them many times)."""
    out = {}
    for split, (json_file, root) in sets.items():
        crops = ObjectCrops(json_file, root, input_size)
        images = torch.stack([crops[i][0] for i in range(len(crops))])
        out[split] = TensorDataset(images, crops.labels)
        out[split].labels, out[split].classes = crops.labels, crops.classes
    return out


def object_chance(sets: dict[str, tuple[str, str]]) -> tuple[dict[str, float | int], list[str]]:
    """The chance levels of the object probes on these sets (`chance_levels`: train's labels, scored on val's),
    and the class names."""
    classes, train = read_coco_objects(sets["train"][0])
    _, val = read_coco_objects(sets["val"][0])
    labels = [torch.tensor([label for _, _, label in objects]) for objects in (train, val)]
    return chance_levels(*labels, len(classes)), classes
