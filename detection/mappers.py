"""How a dataset record becomes a detector's input: detectron2's `DatasetMapper`, reading images as pretraining
reads them.

detectron2's `read_image` converts with PIL's `convert`, which clips a 16-bit grey PNG to white; `read_image`
here scales deep grey images by their bit depth first (`pretrain.data.images.eight_bit`, the conversion of
`open_rgb`) and is otherwise detectron2's: EXIF orientation applied, then the config's format (BGR, RGB, L, ...).
Every detection path reads images through it: the train and test mappers of the configs (`DatasetMapper`,
`BitmaskDatasetMapper`), the detector-view probe and the prediction figures.
"""
from __future__ import annotations

import copy
import os
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
import torch
from detectron2.data import DatasetMapper as _DetectronMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.utils.file_io import PathManager
from PIL import Image, ImageOps

from pretrain.data.images import eight_bit
from pretrain.errors import DataError

__all__ = ["read_image", "DatasetMapper", "BitmaskDatasetMapper"]


def read_image(file_name: str | os.PathLike, format: str | None = "BGR") -> np.ndarray:
    """An image file as an HWC array in `format`, as detectron2's `read_image` returns it (uint8 for PIL modes,
    "BGR" and "RGB"), with 16- and 32-bit grey images scaled to 8 bits instead of clipped.

    Raises:
        OSError, ValueError, Image.DecompressionBombError: as PIL for unreadable files.
    """
    with PathManager.open(str(file_name), "rb") as f:
        image = ImageOps.exif_transpose(Image.open(f))
        image.load()
        return utils.convert_PIL_to_numpy(eight_bit(image), format)


class DatasetMapper(_DetectronMapper):
    """detectron2's `DatasetMapper` (same arguments, augmentations and outputs) reading images with `read_image`.

    An object without a mask where the mapper keeps masks (`use_instance_mask`) is a one-line `DataError`
    rather than detectron2's missing-field error deep in the model.
    """

    def __call__(self, dataset_dict: dict) -> dict:
        """detectron2's `DatasetMapper.__call__` with the image read by `read_image`."""
        dataset_dict = copy.deepcopy(dataset_dict)
        image = read_image(dataset_dict["file_name"], format=self.image_format)
        utils.check_image_size(dataset_dict, image)
        if "sem_seg_file_name" in dataset_dict:
            sem_seg_gt = utils.read_image(dataset_dict.pop("sem_seg_file_name"), "L").squeeze(2)
        else:
            sem_seg_gt = None

        aug_input = T.AugInput(image, sem_seg=sem_seg_gt)
        transforms = self.augmentations(aug_input)
        image, sem_seg_gt = aug_input.image, aug_input.sem_seg

        image_shape = image.shape[:2]
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if sem_seg_gt is not None:
            dataset_dict["sem_seg"] = torch.as_tensor(sem_seg_gt.astype("long"))
        if self.proposal_topk is not None:
            utils.transform_proposals(dataset_dict, image_shape, transforms, proposal_topk=self.proposal_topk)

        if not self.is_train:
            dataset_dict.pop("annotations", None)
            dataset_dict.pop("sem_seg_file_name", None)
            return dataset_dict
        if "annotations" in dataset_dict:
            self._transform_annotations(dataset_dict, transforms, image_shape)
        return dataset_dict

    def _transform_annotations(self, dataset_dict: dict, transforms: Any, image_shape: tuple[int, int]) -> None:
        if self.use_instance_mask and any(not a.get("segmentation") for a in dataset_dict["annotations"]
                                          if a.get("iscrowd", 0) == 0):
            raise DataError(f"{dataset_dict['file_name']}: an object has no mask, but the config trains masks; "
                            "register the set with --dataset, which makes a set without masks train a box-only model, "
                            "or make the model box-only by hand (docs/detection.md)")
        super()._transform_annotations(dataset_dict, transforms, image_shape)


class BitmaskDatasetMapper(DatasetMapper):
    """`DatasetMapper` with polygon masks rasterised (as RLE) before augmentation.

    Cropping polygons (LSJ's `FixedSizeCrop`) needs shapely; cropping rasters needs nothing, so this mapper
    runs LSJ where shapely is missing. Instances then carry `BitMasks`. Other arguments are `DatasetMapper`'s.
    """

    def __init__(self, is_train: bool, **kwargs: Any) -> None:
        kwargs["instance_mask_format"] = "bitmask"
        super().__init__(is_train, **kwargs)

    def _transform_annotations(self, dataset_dict: dict, transforms: Any, image_shape: tuple[int, int]) -> None:
        height, width = dataset_dict["height"], dataset_dict["width"]
        for anno in dataset_dict.get("annotations", []):
            segm = anno.get("segmentation")
            if isinstance(segm, list) and segm:
                anno["segmentation"] = mask_util.merge(mask_util.frPyObjects(segm, height, width))
        super()._transform_annotations(dataset_dict, transforms, image_shape)
