"""ViTDet Mask R-CNN, ViT-H/16: the ViT-B recipe with a 32-block, 1280-wide backbone (100 epochs; ViTDet used 75)."""
from functools import partial

from .mask_rcnn_vitdet_b_100ep import dataloader, get_vit_lr_decay_rate, lr_multiplier, model, optimizer, train

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
