"""ViTDet's ViT with the pretraining encoder's final LayerNorm applied to the last block's output.

Experiment record for docs/results/detection_transfer.md (not project code, not tested by the suite): the backbone of
the final-norm runs, whose init checkpoints add_final_norm.py writes. Put this folder on PYTHONPATH and name the class
in an override:

    PYTHONPATH=docs/results/detection_transfer docs/results/detection_transfer/run_detector.sh NAME INIT ITERS SEED \
        model.backbone.net._target_=vit_with_norm.ViTWithNorm
"""
import torch
import torch.nn as nn

from detection.vit import ViT


class ViTWithNorm(ViT):
    """`detection.vit.ViT` whose single output map goes through `norm` (LayerNorm over channels, eps 1e-6 as MAE's)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.norm = nn.LayerNorm(self._out_feature_channels[self._out_features[0]], eps=1e-6)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(N, C, H, W) image -> {out_feature: (N, D, H / patch, W / patch)}, normalised over D."""
        out = super().forward(x)
        key = self._out_features[0]
        return {key: self.norm(out[key].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)}
