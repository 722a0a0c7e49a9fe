"""Mask R-CNN on ViT-Tiny/16 (the encoder of `mae_vit_tiny_patch16` / `crossmae_vit_tiny_patch16`) for the
built-in shapes: the ViTDet recipe scaled down to a CPU run of minutes.

    .venv/bin/python tools/train_net.py --config-file configs/demo/mask_rcnn_vit_tiny_builtin.py \
        train.init_checkpoint=path/to/converted_tiny.pth   # optional; "" trains from scratch
"""
from functools import partial

from detection.datasets import SHAPE_CATEGORIES, register_builtin_shapes
from detection.layer_decay import get_vit_lr_decay_rate
from detection.mappers import BitmaskDatasetMapper
from detection.schedule import vitdet_lr_multiplier

from ..common.coco_loader_lsj import dataloader, lsj_augmentations
from ..common.mask_rcnn_vitdet import model, narrow_heads
from ..common.optim import optimizer
from ..common.train import train

image_size = 192  # 192 px / 16 px = 12 tokens a side
train_set, val_set = register_builtin_shapes(seed=0, num_train=512, num_val=64, image_size=image_size)

dataloader.train.dataset.names = train_set
dataloader.train.mapper.augmentations = lsj_augmentations(image_size)
dataloader.train.mapper._target_ = BitmaskDatasetMapper  # crops masks as rasters: no shapely needed
dataloader.train.total_batch_size = 4
dataloader.train.num_workers = 2
dataloader.test.dataset.names = val_set
dataloader.test.mapper.augmentations[0].short_edge_length = image_size
dataloader.test.mapper.augmentations[0].max_size = image_size
dataloader.test.num_workers = 2

_net = model.backbone.net
_net.img_size = image_size
_net.embed_dim, _net.depth, _net.num_heads = 192, 12, 3  # ViT-Tiny
_net.drop_path_rate = 0.1
_net.window_size = 6  # 12 tokens a side = 2 x 2 windows of 6; blocks 2, 5, 8, 11 stay global (ViT-B's)
# pos_embed grid of configs/pretrain/*_vit_tiny_cpu.yaml: 96 px / 16 px = 6 x 6 (224 for ImageNet runs)
_net.pretrain_img_size = 96
model.backbone.square_pad = image_size

model.roi_heads.num_classes = len(SHAPE_CATEGORIES)
# A quarter of ViTDet's 256 / 1024: on CPU the heads cost more than the ViT-Tiny (docs/results/demo.md)
narrow_heads(model, channels=64, fc_dim=256)
# At most 6 shapes an image: 32 sampled RoIs still hold the 25% positives, and 100-200 proposals cover them
model.roi_heads.batch_size_per_image = 32
model.proposal_generator.pre_nms_topk = (1000, 500)
model.proposal_generator.post_nms_topk = (200, 100)

train.device = "cpu"
train.output_dir = "./output/demo_vit_tiny_builtin"
# 600 iters * 4 images/iter / 512 images/ep = ~4.7 ep. A run with another
# train.max_iter keeps these steps: the demo moves them (schedule_overrides) to 8/9 and 26/27 of its run
train.max_iter = 600
train.eval_period = 200
train.checkpointer.period = 200
train.log_period = 20
train.seed = 0

optimizer.lr = 2e-4  # 2x ViTDet's 1e-4: a short run from few images
# steps at 600 * 8 / 9 = 533 and 600 * 26 / 27 = 578 (ViTDet's positions), after 25 warm-up iterations
lr_multiplier = vitdet_lr_multiplier(train.max_iter, warmup_iters=25)
# ViT-B's decay 0.7 over 12 blocks: ViT-Tiny has the same depth
optimizer.params.lr_factor_func = partial(get_vit_lr_decay_rate, num_layers=12, lr_decay_rate=0.7)
