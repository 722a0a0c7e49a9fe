"""ViTDet Cascade Mask R-CNN, ViT-H: the Mask R-CNN recipe with three box stages (IoU 0.5, 0.6, 0.7), 75 epochs."""
from ..common.cascade_rcnn import to_cascade

from .mask_rcnn_vitdet_h_75ep import dataloader, lr_multiplier, model, optimizer, train

to_cascade(model.roi_heads)
