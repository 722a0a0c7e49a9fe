"""How much of each block's output is the embedded input (patch embedding + position), per pretraining encoder.

For the demo's step-0, MAE step-768 and step-256 and CrossMAE step-768 snapshots, on the first 64 demo pretraining
images (sorted, 96 px, all patches, cls token dropped from the statistics): after blocks 1, 4, 8 and 12 the mean
cosine between a token and its embedded input, the mean |out - in| / |out|, and the mean token norm.

Experiment record for docs/results/detection_transfer.md (not project code, not tested by the suite).

usage: .venv/bin/python docs/results/detection_transfer/residual_share.py DEMO_OUTPUT [--seed N]
    (DEMO_OUTPUT: tools/demo.py's output folder, holding pretrain_images/ and seedN/pretrain/)
"""
import torch

from _demo import demo_encoders


def main() -> None:
    snapshots = [("step0", "mae/snapshots/step-0000000.pth"), ("mae768", "mae/snapshots/step-0000768.pth"),
                 ("mae256", "mae/snapshots/step-0000256.pth"),
                 ("crossmae768", "crossmae/snapshots/step-0000768.pth")]
    imgs, encoders = demo_encoders(__doc__.split("\n\n")[0], snapshots)
    for name, enc in encoders:
        ids = torch.arange(enc.num_patches).expand(len(imgs), -1)
        with torch.no_grad():
            feats = enc.forward_features(imgs, ids)
        x0 = feats[0][:, 1:]
        row = []
        for b in (1, 4, 8, 12):
            xb = feats[b][:, 1:]
            cos = torch.nn.functional.cosine_similarity(xb, x0, dim=-1).mean().item()
            share = ((xb - x0).norm(dim=-1) / xb.norm(dim=-1)).mean().item()
            row.append(f"b{b}: cos {cos:.2f} added/out {share:.2f} |out| {xb.norm(dim=-1).mean():.1f}")
        print(name, f"|in| {x0.norm(dim=-1).mean():.2f};", "; ".join(row))


if __name__ == "__main__":
    main()
