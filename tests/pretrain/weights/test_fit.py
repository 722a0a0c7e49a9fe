"""Fitting an encoder's tensors (`pretrain.weights.fit`): its shape read off a state dict, and the position grid
resampled with the cls slot kept."""
import torch
from timm.models.vision_transformer import VisionTransformer

from pretrain.weights.fit import encoder_shape, resize_pos_embed

D, PATCH = 16, 16


def test_encoder_shape():
    torch.manual_seed(0)
    encoder = VisionTransformer(img_size=224, patch_size=PATCH, embed_dim=D, depth=3, num_heads=2, mlp_ratio=2.0,
                                num_classes=0).eval()
    assert encoder_shape(encoder.state_dict()) == {"embed_dim": D, "depth": 3, "patch_size": PATCH}


def test_position_grid_resampling_keeps_the_cls_slot():
    """timm's resampling keeps the cls slot; a grid of the wanted size is returned as it is. (Into ViTDet the
    pretrained grid is kept instead: tests/detection/test_convert.py.)"""
    torch.manual_seed(0)
    pos = torch.randn(1, 1 + 4 * 4, 192)
    assert resize_pos_embed(pos, 4) is pos
    small = resize_pos_embed(pos, 2)
    assert small.shape == (1, 5, 192) and torch.equal(small[:, 0], pos[:, 0])
