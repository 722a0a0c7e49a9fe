"""Divide the residual stream of a detectron2 ViT init by S: the patch embedding, position embedding and every
block's attn.proj / mlp.fc2 scaled by 1/S. Pre-LN blocks see LN(x / S) = LN(x), so each block computes what it did;
only the stream's scale (and so how far a fine-tuning update moves it) changes.

Experiment record for docs/results/detection_transfer.md (not project code, not tested by the suite). The
"stream / 8" run's init came from

    .venv/bin/python docs/results/detection_transfer/rescale_stream.py DEMO_OUTPUT/seed0/pretrain/d2_mae.pth 8 \
        detection_transfer_runs/inits/mae_stream_div8.pth

usage: rescale_stream.py INPUT S OUTPUT
"""
import torch

from _demo import edit_checkpoint


def rescale(key: str, tensor: torch.Tensor, s: float) -> torch.Tensor | None:
    """Divide what writes into the stream by `s`: patch and position embedding, attn.proj, mlp.fc2."""
    writes = key.startswith("backbone.net.patch_embed.") or key == "backbone.net.pos_embed"
    if key.startswith("backbone.net.") and (writes or ".attn.proj." in key or ".mlp.fc2." in key):
        return tensor / s
    return None


if __name__ == "__main__":
    edit_checkpoint(__doc__.split("\n\n")[0], ("S", float, "divisor of the residual stream"), rescale,
                    "{input} stream / {value}")
