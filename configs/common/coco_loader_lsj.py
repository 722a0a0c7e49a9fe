"""COCO 2017 loaders with large-scale jitter (LSJ) at 1024 px, as in ViTDet, and the COCO AP evaluator."""
from omegaconf import OmegaConf

import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.data import build_detection_test_loader, build_detection_train_loader, get_detection_dataset_dicts

from detection.evaluation import build_coco_evaluator
from detection.mappers import DatasetMapper  # detectron2's, reading 16-bit images as pretraining does


def lsj_augmentations(image_size: int) -> list:
    """Flip, resize the image to fit a (0.1-2.0) x `image_size` square, then crop it to at most `image_size`.

    No padding here, as ViTDet: the backbone's `square_pad` pads the normalised image with zeros to the square
    (`detection.vit.SimpleFeaturePyramid`), and the recorded image size stays the crop's, so proposals are
    clipped to the image rather than to the padding.
    """
    return [
        L(T.RandomFlip)(horizontal=True),  # flip before resizing, as ViTDet
        L(T.ResizeScale)(min_scale=0.1, max_scale=2.0, target_height=image_size, target_width=image_size),
        L(T.FixedSizeCrop)(crop_size=(image_size, image_size), pad=False),
    ]


image_size = 1024

dataloader = OmegaConf.create()

dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_train"),
    mapper=L(DatasetMapper)(
        is_train=True,
        augmentations=lsj_augmentations(image_size),
        image_format="RGB",
        use_instance_mask=True,
        recompute_boxes=True,  # boxes cut by the crop are re-fitted to their cropped masks
    ),
    total_batch_size=64,
    num_workers=4,
)

dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_val", filter_empty=False),
    mapper=L(DatasetMapper)(
        is_train=False,
        augmentations=[L(T.ResizeShortestEdge)(short_edge_length=image_size, max_size=image_size)],
        image_format="${...train.mapper.image_format}",
    ),
    num_workers=4,
)

dataloader.evaluator = L(build_coco_evaluator)(dataset_name="${..test.dataset.names}")
