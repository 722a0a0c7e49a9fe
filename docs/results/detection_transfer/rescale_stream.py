"""Divide the residual stream of a detectron2 ViT init by S: the patch embedding, position embedding and every
block's attn.proj / mlp.fc2 scaled by 1/S. Pre-LN blocks see LN(x / S) = LN(x), so each block computes what it did;
only the stream's scale (and so how far a fine-tuning update moves it) changes.

Experiment record for docs/results/detection_transfer.md (not project code, not tested by the suite). The
"stream / 8" run's init came from

    .venv/bin/python docs/results/detection_transfer/rescale_stream.py DEMO_OUTPUT/seed0/pretrain/d2_mae.pth 8 \
        detection_transfer_runs/inits/mae_stream_div8.pth

usage: rescale_stream.py INPUT S OUTPUT
"""
import argparse
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", type=Path, help="detectron2 checkpoint (e.g. DEMO_OUTPUT/seed0/pretrain/d2_mae.pth)")
    p.add_argument("scale", type=float, metavar="S", help="divisor of the residual stream")
    p.add_argument("output", type=Path, help="detectron2 checkpoint to write")
    a = p.parse_args()
    s = a.scale
    sd = dict(torch.load(a.input, weights_only=True)["model"])
    n = 0
    for k in list(sd):
        if k.startswith("backbone.net.") and (k.startswith("backbone.net.patch_embed.") or k == "backbone.net.pos_embed"
                                              or ".attn.proj." in k or ".mlp.fc2." in k):
            sd[k] = sd[k] / s
            n += 1
    a.output.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": sd, "__author__": f"{a.input.name} stream / {s}"}, a.output)
    print("scaled", n, "tensors")


if __name__ == "__main__":
    main()
