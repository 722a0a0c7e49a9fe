"""ViTDet Mask R-CNN, ViT-H/16: the ViT-B recipe with a 32-block, 1280-wide backbone, 75 epochs (as ViTDet)."""
from functools import partial

from detection.schedule import vitdet_lr_multiplier

from .mask_rcnn_vitdet_b_100ep import dataloader, get_vit_lr_decay_rate, model, optimizer, train

# patch 16 as ViTDet: MAE's ViT-H/14 (train.init_checkpoint=mae_vit_huge) is resampled to it on conversion
model.backbone.net.embed_dim = 1280
model.backbone.net.depth = 32
model.backbone.net.num_heads = 16
model.backbone.net.drop_path_rate = 0.5
# 7, 15, 23, 31 attend globally: every 32 / 4 = 8th block
model.backbone.net.window_block_indexes = [i for i in range(32) if i not in (7, 15, 23, 31)]

optimizer.params.lr_factor_func = partial(get_vit_lr_decay_rate, num_layers=32, lr_decay_rate=0.9)
# ViTDet's H recipe: weight decay on every parameter, pos_embed and norms included
optimizer.params.overrides = {}
optimizer.params.weight_decay_norm = None

# 75 ep = 184375 * 3 // 4 = 138281 iters * 64 images/iter / 118000 images/ep
train.max_iter = 184375 * 3 // 4
# x0.1 at 138281 * 8 / 9 = 122916, x0.01 at 138281 * 26 / 27 = 133159: ViTDet's B steps x 3 / 4. ViTDet keeps
# B's warm-up as a fraction of the run (250 / 184375), i.e. 187.5 of these iterations
lr_multiplier = vitdet_lr_multiplier(train.max_iter, warmup_iters=250 * 3 / 4)
