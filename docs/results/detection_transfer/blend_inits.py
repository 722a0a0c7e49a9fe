"""Experiment record (not project code, not tested by the suite): a detectron2 init between two others, for every
backbone tensor `a + t * (b - a)` (the heads' tensors are `b`'s). With a = the step-0 control and b = MAE it asks
whether a shorter departure from the initialisation fine-tunes better.

usage: blend_inits.py A_CHECKPOINT B_CHECKPOINT T OUTPUT
"""
import argparse

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("t", type=float)
    p.add_argument("output")
    args = p.parse_args()
    a = torch.load(args.a, weights_only=True)["model"]
    b = torch.load(args.b, weights_only=True)["model"]
    sd = {k: (a[k] + args.t * (b[k] - a[k]) if k.startswith("backbone.net.") else b[k]) for k in b}
    torch.save({"model": sd, "__author__": f"{args.a} + {args.t} ({args.b} - {args.a})"}, args.output)
    print(f"{args.output}: {len(sd)} tensors")


if __name__ == "__main__":
    main()
