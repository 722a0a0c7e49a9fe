"""Make the blocks of a detectron2 ViT init from K on identity maps: their attn.proj and mlp.fc2 zeroed, so each
residual branch adds nothing and the stream leaves block K - 1 unchanged (K = 0: patch and position embedding only).

Experiment record for docs/results/detection_transfer.md (not project code, not tested by the suite). The inits of
the "pixel" and "keep K" runs came from the demo's conversions, e.g.

    .venv/bin/python docs/results/detection_transfer/identity_blocks.py DEMO_OUTPUT/seed0/pretrain/d2_mae.pth 3 \
        detection_transfer_runs/inits/mae_keep3.pth

usage: identity_blocks.py INPUT K OUTPUT
"""
import argparse
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", type=Path, help="detectron2 checkpoint (e.g. DEMO_OUTPUT/seed0/pretrain/d2_mae.pth)")
    p.add_argument("keep", type=int, metavar="K", help="first block made identity; blocks before it keep their weights")
    p.add_argument("output", type=Path, help="detectron2 checkpoint to write")
    a = p.parse_args()
    sd = dict(torch.load(a.input, weights_only=True)["model"])
    for k in list(sd):
        parts = k.split(".")
        if (k.startswith("backbone.net.blocks.") and int(parts[3]) >= a.keep
                and (".attn.proj." in k or ".mlp.fc2." in k)):
            sd[k] = torch.zeros_like(sd[k])
    a.output.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": sd, "__author__": f"{a.input.name} blocks {a.keep}+ identity"}, a.output)
    print(a.output)


if __name__ == "__main__":
    main()
