"""Fine-tuning data: ImageNet-layout `train/` and `val/` splits, MAE's transforms, Mixup / CutMix and the loss.

Everything here is timm's or torchvision's, configured as MAE's `util/datasets.py` and `main_finetune.py` do:
`create_transform` (RandomResizedCrop, flip, RandAugment, random erasing) for training; a bicubic resize to
`input_size / 0.875` (up to 224 px; 1.0 above) and a centre crop for evaluation; `Mixup` (which also smooths the
labels) with `SoftTargetCrossEntropy`, else `LabelSmoothingCrossEntropy`, else cross-entropy.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps
from timm.data import Mixup, create_transform
from timm.data.auto_augment import RandAugment
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torchvision import datasets, transforms

from ..data.images import IMAGENET_MEAN, IMAGENET_STD, decode_or_none, first_readable, open_rgb
from ..errors import DataError

__all__ = ["LabelledImages", "build_transform", "build_splits", "build_mixup", "build_criterion"]



def posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's `posterize` with Pillow < 12's meaning of 0 bits kept: a black image. RandAugment's increasing
    posterize keeps 4 - int(4 * magnitude / 10) bits, so 0 at magnitude 10, which `rand-m9-mstd0.5` reaches;
    Pillow 12 and later refuse 0 bits with a ValueError."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def build_transform(is_train: bool, cfg: dict[str, Any]) -> transforms.Compose:
    """MAE's `build_transform`: timm's training pipeline, or resize + centre crop for evaluation."""
    if is_train:
        pipeline = create_transform(input_size=cfg["input_size"], is_training=True, color_jitter=cfg["color_jitter"],
                                    auto_augment=cfg["aa"], interpolation="bicubic", re_prob=cfg["reprob"],
                                    re_mode=cfg["remode"], re_count=cfg["recount"], mean=IMAGENET_MEAN,
                                    std=IMAGENET_STD)
        for step in pipeline.transforms:  # this pipeline's ops only; timm's own table stays as it is
            for op in step.ops if isinstance(step, RandAugment) else ():
                if op.name.startswith("Posterize"):
                    op.aug_fn = posterize
        return pipeline
    crop_pct = 224 / 256 if cfg["input_size"] <= 224 else 1.0
    return transforms.Compose([
        transforms.Resize(int(cfg["input_size"] / crop_pct), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(cfg["input_size"]),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class LabelledImages(datasets.ImageFolder):
    """An ImageFolder split read through `open_rgb` (16-bit PNGs scaled, not clipped); an unreadable image is
    replaced by the next readable one, with that one's label, as pretraining does (`first_readable`)."""

    def __init__(self, root: str | Path, transform) -> None:
        super().__init__(str(root), transform=transform, loader=open_rgb)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        i, image, _ = first_readable(lambda j: decode_or_none(self.samples[j][0]), index, len(self.samples),
                                     self.root)
        return self.transform(image), self.samples[i][1]


def _split(root: Path, name: str, transform) -> LabelledImages:
    folder = root / name
    if not folder.is_dir():
        raise DataError(f"{root} has no {name}/ folder; fine-tuning needs {root}/train/<class>/<image> and "
                        f"{root}/val/<class>/<image> (the ImageNet layout)")
    try:
        return LabelledImages(folder, transform)
    except (FileNotFoundError, OSError) as e:
        raise DataError(f"{folder} holds no labelled images ({str(e).splitlines()[0]}); put each class's images "
                        "in a folder of its own") from None


def build_splits(cfg: dict[str, Any], with_train: bool = True) -> tuple[LabelledImages | None, LabelledImages]:
    """The `train/` (unless `with_train` is False) and `val/` splits of `cfg["data_path"]`.

    Raises:
        DataError: a missing split, a split without class folders, or val classes that train does not have.
    """
    root = Path(cfg["data_path"])
    if not root.is_dir():
        raise DataError(f"--data_path {root} not found; give an ImageNet-layout root holding train/ and val/")
    val = _split(root, "val", build_transform(False, cfg))
    train = _split(root, "train", build_transform(True, cfg)) if with_train else None
    if train is not None and train.classes != val.classes:
        extra = sorted(set(val.classes) ^ set(train.classes))
        raise DataError(f"{root}: train/ and val/ have different class folders ({extra[:5]}); labels would not "
                        "match; give both splits the same classes")
    return train, val


def build_mixup(cfg: dict[str, Any], num_classes: int) -> Mixup | None:
    """timm's Mixup / CutMix as MAE configures it (label smoothing included), or None when both are off."""
    if not (cfg["mixup"] > 0 or cfg["cutmix"] > 0 or cfg["cutmix_minmax"] is not None):
        return None
    return Mixup(mixup_alpha=cfg["mixup"], cutmix_alpha=cfg["cutmix"], cutmix_minmax=cfg["cutmix_minmax"],
                 prob=cfg["mixup_prob"], switch_prob=cfg["mixup_switch_prob"], mode=cfg["mixup_mode"],
                 label_smoothing=cfg["smoothing"], num_classes=num_classes)


def build_criterion(cfg: dict[str, Any], mixup: Mixup | None) -> torch.nn.Module:
    """MAE's training loss: soft-target cross-entropy under Mixup, else label smoothing, else cross-entropy."""
    if mixup is not None:
        return SoftTargetCrossEntropy()
    if cfg["smoothing"] > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg["smoothing"])
    return torch.nn.CrossEntropyLoss()
