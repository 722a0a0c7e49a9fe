"""Add a pretraining encoder's final LayerNorm (`norm.weight`, `norm.bias`) to a detectron2 ViT init as
`backbone.net.norm.*`, the parameters of vit_with_norm.ViTWithNorm. Prints the mean |weight| and |bias| of that norm.

Experiment record for docs/results/detection_transfer.md (not project code, not tested by the suite). The final-norm
runs' inits came from the demo's snapshots and conversions, e.g.

    .venv/bin/python docs/results/detection_transfer/add_final_norm.py \
        DEMO_OUTPUT/seed0/pretrain/mae/snapshots/step-0000768.pth DEMO_OUTPUT/seed0/pretrain/d2_mae.pth \
        detection_transfer_runs/inits/mae_norm.pth
    (and step-0000000.pth with d2_step0.pth for step0_norm.pth)

usage: add_final_norm.py SNAPSHOT D2_CHECKPOINT OUTPUT
"""
import argparse
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("snapshot", type=Path, help="pretraining snapshot or checkpoint whose model holds norm.weight/bias")
    p.add_argument("d2_checkpoint", type=Path, help="detectron2 checkpoint converted from the same encoder")
    p.add_argument("output", type=Path, help="detectron2 checkpoint to write")
    a = p.parse_args()
    sd = torch.load(a.snapshot, weights_only=True)["model"]
    m = dict(torch.load(a.d2_checkpoint, weights_only=True)["model"])
    m["backbone.net.norm.weight"], m["backbone.net.norm.bias"] = sd["norm.weight"].clone(), sd["norm.bias"].clone()
    a.output.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": m}, a.output)
    print(a.output.stem, sd["norm.weight"].abs().mean().item(), sd["norm.bias"].abs().mean().item())


if __name__ == "__main__":
    main()
