"""Does dropping the cls token (as ViTDet does) change a pretrained encoder's patch features?

For the demo's step-0, MAE step-768 and CrossMAE step-768 snapshots, on the first 64 demo pretraining images (sorted,
96 px, all patches): the last block's patch tokens with the cls token in the sequence (as pretrained) against
without it (as ViTDet runs the encoder). Prints their mean cosine, mean relative difference, mean token norms and
the dominance of each view (largest |channel mean| / median channel std).

Experiment record for docs/results/detection_transfer.md (not project code, not tested by the suite).

usage: .venv/bin/python docs/results/detection_transfer/cls_drop.py DEMO_OUTPUT [--seed N]
    (DEMO_OUTPUT: tools/demo.py's output folder, holding pretrain_images/ and seedN/pretrain/)
"""
import torch

from _demo import demo_encoders


def dominance(t: torch.Tensor) -> float:
    """Largest |channel mean| / median channel std of tokens (..., C)."""
    t = t.reshape(-1, t.shape[-1])
    return (t.mean(0).abs().max() / t.std(0).median()).item()


def main() -> None:
    snapshots = [("step0", "mae/snapshots/step-0000000.pth"), ("mae768", "mae/snapshots/step-0000768.pth"),
                 ("crossmae768", "crossmae/snapshots/step-0000768.pth")]
    imgs, encoders = demo_encoders(__doc__.split("\n\n")[0], snapshots)
    for name, enc in encoders:
        ids = torch.arange(enc.num_patches).expand(len(imgs), -1)
        with torch.no_grad():
            with_cls = enc.forward_features(imgs, ids)[-1][:, 1:]
            x = enc.patch_embed(imgs) + enc.pos_embed[:, 1:]
            for blk in enc.blocks:
                x = blk(x)
            no_cls = x
        cos = torch.nn.functional.cosine_similarity(with_cls, no_cls, dim=-1).mean().item()
        rel = ((with_cls - no_cls).norm(dim=-1) / with_cls.norm(dim=-1)).mean().item()
        print(f"{name}: cos(with cls, without) {cos:.3f}, rel diff {rel:.3f}, |tok| {with_cls.norm(dim=-1).mean():.0f} "
              f"vs {no_cls.norm(dim=-1).mean():.0f}, dominance {dominance(with_cls):.1f} vs {dominance(no_cls):.1f}")


if __name__ == "__main__":
    main()
