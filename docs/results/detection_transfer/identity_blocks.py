"""Make the blocks of a detectron2 ViT init from K on identity maps: their attn.proj and mlp.fc2 zeroed, so each
residual branch adds nothing and the stream leaves block K - 1 unchanged (K = 0: patch and position embedding only).

Experiment record for docs/results/detection_transfer.md (not project code, not tested by the suite). The inits of
the "pixel" and "keep K" runs came from the demo's conversions, e.g.

    .venv/bin/python docs/results/detection_transfer/identity_blocks.py DEMO_OUTPUT/seed0/pretrain/d2_mae.pth 3 \
        detection_transfer_runs/inits/mae_keep3.pth

usage: identity_blocks.py INPUT K OUTPUT
"""
import torch

from _demo import edit_checkpoint


def identity(key: str, tensor: torch.Tensor, keep: int) -> torch.Tensor | None:
    """Zero attn.proj and mlp.fc2 of the blocks from `keep` on."""
    parts = key.split(".")
    if (key.startswith("backbone.net.blocks.") and int(parts[3]) >= keep
            and (".attn.proj." in key or ".mlp.fc2." in key)):
        return torch.zeros_like(tensor)
    return None


if __name__ == "__main__":
    edit_checkpoint(__doc__.split("\n\n")[0],
                    ("K", int, "first block made identity; blocks before it keep their weights"), identity,
                    "{input} blocks {value}+ identity")
