"""ViTDet Mask R-CNN, ViT-B, COCO 2017: 100 epochs, LSJ at 1024 px (detectron2 projects/ViTDet, arXiv 2203.16527)."""
from functools import partial

from detection.layer_decay import get_vit_lr_decay_rate
from detection.schedule import vitdet_lr_multiplier

from ..common.coco_loader_lsj import dataloader
from ..common.mask_rcnn_vitdet import model
from ..common.optim import optimizer
from ..common.train import train

train.amp.enabled = True
train.ddp.fp16_compression = True
# e.g. tools/convert_pretrain_to_d2.py output of an MAE / CrossMAE ViT-B/16 pretraining run, any ViT-B weights
# file (converted on load), or a released-weights name: train.init_checkpoint=mae_vit_base
train.init_checkpoint = ""

# 100 ep = 184375 iters * 64 images/iter / 118000 images/ep
train.max_iter = 184375
train.eval_period = 5000
train.checkpointer.period = 5000

# x0.1 at 184375 * 8 / 9 = 163889 (88.9 ep), x0.01 at 184375 * 26 / 27 = 177546 (96.3 ep), after 250 warm-up
# iterations, as ViTDet
lr_multiplier = vitdet_lr_multiplier(train.max_iter, warmup_iters=250)

# 12 blocks; block i's LR is scaled by 0.7 ** (12 + 1 - (i + 1)), the patch embedding by 0.7 ** 13
optimizer.params.lr_factor_func = partial(get_vit_lr_decay_rate, num_layers=12, lr_decay_rate=0.7)
optimizer.params.overrides = {"pos_embed": {"weight_decay": 0.0}}
