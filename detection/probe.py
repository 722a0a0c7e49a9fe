"""The detector's view of objects: features read the way Mask R-CNN reads them, to probe an encoder before any
detector is trained.

Each image takes the test-time path of a detectron2 config: its test mapper's augmentations, the model's
normalisation and padding, and the ViTDet backbone the config builds, with the weights of a checkpoint (a
pretraining file is converted for the config's ViT on the fly, as `train.init_checkpoint` is). Each ground-truth
box, mapped through the same transforms, is RoIAligned (torchvision's `roi_align`, `aligned=True` as detectron2's
ROIAlignV2) from one ViT block's output (stride = the patch) or one pyramid level (p2..p6), into `roi_size` x
`roi_size` cells, flattened. Pyramid levels of a pretraining checkpoint are freshly initialised (at `seed`): only a
detectron2 checkpoint holds trained ones. The crop probe (`pretrain.evaluation.objects.ObjectCrops`) shows the
same objects filling the encoder's input instead.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import detectron2.data.transforms as T
import numpy as np
import torch
from detectron2.config import LazyConfig, instantiate
from torch.utils.data import Dataset
from torchvision.ops import roi_align
from tqdm import tqdm

from pretrain.errors import ConfigError, DataError
from pretrain.evaluation.health import token_stats
from pretrain.evaluation.objects import read_coco_objects
from pretrain.evaluation.probe import chance_levels, score_features

from .checkpointer import SafeCheckpointer
from .lazyconfig import check_overrides
from .mappers import read_image

__all__ = ["build_detector", "DetectorObjects", "parse_source", "detector_features", "run_detector_probe"]

LEVELS = ("p2", "p3", "p4", "p5", "p6")


def build_detector(config_file: str | Path, checkpoint: str | Path | None, overrides: Sequence[str] = (),
                   trust_pickle: bool = False, seed: int = 0) -> tuple[torch.nn.Module, Any]:
    """The model a detectron2 LazyConfig builds, in eval mode on CPU, with the weights of `checkpoint` (any weights
    file or release name `train.init_checkpoint` takes; None: the config's own initialisation, at `seed`).

    Raises:
        ConfigError: the config is missing, or an override names no key.
        CheckpointError: the checkpoint cannot be read or does not fit the config's ViT.
    """
    if not Path(config_file).is_file():
        raise ConfigError(f"config {config_file} not found; give a detectron2 LazyConfig, e.g. "
                          "configs/demo/mask_rcnn_vit_tiny_builtin.py")
    cfg = LazyConfig.load(str(config_file))
    check_overrides(cfg, list(overrides))
    cfg = LazyConfig.apply_overrides(cfg, list(overrides))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = instantiate(cfg.model)
    if checkpoint:
        checkpointer = SafeCheckpointer(model, trust_pickle=trust_pickle)
        # its log lists the pyramid and heads a pretraining file lacks, as expected here; a backbone weight it leaves
        # unset is an error all the same
        level = checkpointer.logger.level
        checkpointer.logger.setLevel(logging.ERROR)
        try:
            checkpointer.load(str(checkpoint))
        finally:
            checkpointer.logger.setLevel(level)
    return model.eval(), cfg


class DetectorObjects(Dataset):
    """The images of a COCO-format set through test-time augmentations, with their objects.

    Yields (image (3, H, W) uint8 tensor in `image_format`, boxes (K, 4) XYXY float in the augmented image's
    pixels, category indices (K,)); `labels` holds every object's category index in the order the images yield
    them, `classes` the class names (ascending category id).
    """

    def __init__(self, json_file: str | Path, image_root: str | Path, augmentations: Sequence[T.Augmentation],
                 image_format: str = "RGB") -> None:
        self.classes, objects = read_coco_objects(json_file)
        self.image_root, self.augmentations, self.image_format = Path(image_root), list(augmentations), image_format
        by_image: dict[str, list[tuple[tuple[float, ...], int]]] = {}
        for file_name, box, label in objects:
            by_image.setdefault(file_name, []).append((box, label))
        self.images = sorted(by_image.items())
        self.labels = torch.tensor([label for _, objs in self.images for _, label in objs])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        file_name, objs = self.images[index]
        try:
            image = read_image(self.image_root / file_name, format=self.image_format)
        except OSError as e:
            raise DataError(f"cannot read {self.image_root / file_name} ({e}); check the image folder") from None
        aug = T.AugInput(image)
        transform = T.AugmentationList(self.augmentations)(aug)
        boxes = np.array([[x, y, x + w, y + h] for (x, y, w, h), _ in objs], dtype=np.float64)
        pixels = torch.as_tensor(np.ascontiguousarray(aug.image.transpose(2, 0, 1)))
        return (pixels, torch.as_tensor(transform.apply_box(boxes), dtype=torch.float32),
                torch.tensor([label for _, label in objs]))


def parse_source(model: torch.nn.Module, source: str) -> tuple[str, int | str]:
    """("block", index) for "block:N" (negative counts from the end) or ("level", name) for "p2".."p6".

    Raises:
        ConfigError: a block outside the ViT, or a level the pyramid does not have.
    """
    if source.startswith("block:"):
        depth = len(model.backbone.net.blocks)
        try:
            block = int(source.split(":", 1)[1])
        except ValueError:
            block = depth
        if not -depth <= block < depth:
            raise ConfigError(f"--block {source.split(':', 1)[1]} is outside the ViT's {depth} blocks; use "
                              f"0..{depth - 1} or -1")
        return "block", block % depth
    if source not in model.backbone.output_shape():
        raise ConfigError(f"--level {source}: the pyramid has {', '.join(model.backbone.output_shape())}")
    return "level", source


@torch.no_grad()
def detector_features(model: torch.nn.Module, dataset: DetectorObjects, source: str = "block:-1",
                      roi_size: int = 4, desc: str = "detector-view features"
                      ) -> tuple[torch.Tensor, list[dict[str, float]]]:
    """RoI features of every object, and the feature health of every ViT block over the images.

    Args:
        model: a detectron2 GeneralizedRCNN with a ViTDet backbone (`build_detector`), in eval mode.
        dataset: the objects (`DetectorObjects`).
        source: "block:N" (a ViT block's output) or a pyramid level "p2".."p6".
        roi_size: RoIAlign output side.

    Returns:
        (features (objects, C * roi_size ** 2) in the dataset's object order, one `token_stats` dict per block,
        over the tokens of every image).
    """
    kind, which = parse_source(model, source)
    blocks = model.backbone.net.blocks
    outputs: dict[int, torch.Tensor] = {}
    hooks = [blk.register_forward_hook(lambda _m, _i, out, i=i: outputs.__setitem__(i, out))
             for i, blk in enumerate(blocks)]
    features, per_block = [], [[] for _ in blocks]
    try:
        for image, boxes, _ in tqdm(dataset, desc=desc, unit="image", disable=None, leave=False, dynamic_ncols=True):
            images = model.preprocess_image([{"image": image}])
            pyramid = model.backbone(images.tensor)
            for i in range(len(blocks)):
                per_block[i].append(outputs[i].reshape(-1, outputs[i].shape[-1]))
            if kind == "block":
                fmap, stride = outputs[which].permute(0, 3, 1, 2), model.backbone.net.patch_embed.proj.stride[0]
            else:
                fmap, stride = pyramid[which], model.backbone.output_shape()[which].stride
            rois = roi_align(fmap.float(), [boxes], output_size=roi_size, spatial_scale=1.0 / stride,
                             sampling_ratio=0, aligned=True)
            features.append(rois.flatten(1))
    finally:
        for hook in hooks:
            hook.remove()
    return torch.cat(features), [token_stats(torch.cat(tokens)) for tokens in per_block]


def run_detector_probe(checkpoint: str | Path | None, config_file: str | Path, train: tuple[str, str],
                       val: tuple[str, str], *, overrides: Sequence[str] = (), source: str = "block:-1",
                       roi_size: int = 4, trust_pickle: bool = False, seed: int = 0,
                       **probe_args: Any) -> dict[str, Any]:
    """k-NN and linear-probe accuracy of detector-view object features (`detector_features`) of `checkpoint`.

    Args:
        train, val: (json, image folder) of the sets to train the probes on and to score them on.
        probe_args: `pretrain.evaluation.probe.score_features`' k, temperature and linear-probe arguments.

    Returns:
        A JSON-ready dict: checkpoint, config, view, source, roi_size, sample and class counts, the accuracies,
        their chance levels (`chance_levels`) and the per-block feature health of the val images.
    """
    model, cfg = build_detector(config_file, checkpoint, overrides, trust_pickle, seed)
    augs = [instantiate(a) for a in cfg.dataloader.test.mapper.augmentations]
    image_format = cfg.dataloader.test.mapper.get("image_format", "BGR")
    sets = {split: DetectorObjects(*files, augs, image_format) for split, files in (("train", train), ("val", val))}
    feats = {split: detector_features(model, s, source, roi_size, desc=f"{split} detector-view features")
             for split, s in sets.items()}
    scores = score_features(feats["train"][0], sets["train"].labels, feats["val"][0], sets["val"].labels,
                            len(sets["train"].classes), seed=seed, **probe_args)
    return {"checkpoint": str(checkpoint or ""), "config": str(config_file), "view": "detector", "source": source,
            "roi_size": roi_size, "feature_dim": feats["train"][0].shape[1], "train_samples": len(sets["train"].labels),
            "val_samples": len(sets["val"].labels), "classes": sets["train"].classes,
            "knn": {"accuracy": scores["knn"]}, "linear": {"accuracy": scores["linear"]},
            "chance": chance_levels(sets["train"].labels, sets["val"].labels, len(sets["train"].classes)),
            "feature_health": feats["val"][1]}
