"""Token-level objectness probe: from a ViTDet block's output (stride 16) can a linear map tell whether a token's
centre lies inside a ground-truth box? AUC and balanced accuracy of a linear probe, train -> val.

Experiment record for docs/results/detection_transfer.md (not project code, not tested by the suite).

usage: .venv/bin/python docs/results/detection_transfer/objectness.py NAME=CHECKPOINT [NAME=CHECKPOINT ...] [--block N]
    (CHECKPOINT: a detectron2 checkpoint of configs/demo/mask_rcnn_vit_tiny_builtin.py, e.g. a run's model_final.pth
    or a converted init)
"""
import argparse
from pathlib import Path

import torch

import detection  # noqa: F401  (compat layer before detectron2)
from detectron2.config import instantiate
from detection.lazyconfig import config_datasets
from detection.probe import DetectorObjects, build_detector
from pretrain.evaluation.probe import LinearHead

CONFIG = str(Path(__file__).resolve().parents[3] / "configs/demo/mask_rcnn_vit_tiny_builtin.py")


@torch.no_grad()
def token_set(model: torch.nn.Module, ds: DetectorObjects, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block `block`'s tokens of every image and whether each token's centre lies inside a GT box.

    Returns:
        features (T, C) and labels (T,) in {0, 1}, T = tokens over all images.
    """
    outs = {}
    h = model.backbone.net.blocks[block].register_forward_hook(lambda m, i, o: outs.__setitem__("x", o))
    feats, labels = [], []
    for image, boxes, _ in ds:
        images = model.preprocess_image([{"image": image}])
        model.backbone.net(images.tensor)  # 192 px test images: already the square
        x = outs["x"][0]  # (H, W, C)
        hh, ww = x.shape[:2]
        ys = (torch.arange(hh) + 0.5) * 16
        xs = (torch.arange(ww) + 0.5) * 16
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        inside = torch.zeros(hh, ww, dtype=torch.bool)
        for x0, y0, x1, y1 in boxes.tolist():
            inside |= (cx >= x0) & (cx <= x1) & (cy >= y0) & (cy <= y1)
        feats.append(x.reshape(-1, x.shape[-1]))
        labels.append(inside.reshape(-1).long())
    h.remove()
    return torch.cat(feats), torch.cat(labels)


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC AUC of `scores` (T,) for binary `labels` (T,), by the rank-sum (Mann-Whitney) formula."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    order = torch.cat([pos, neg]).argsort().argsort().float() + 1
    return float((order[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def probe(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float]:
    """Class-balanced linear probe (30 epochs SGD, seed 0) on `train`; returns (AUC, balanced accuracy) on `val`."""
    torch.manual_seed(0)
    head = LinearHead(train[0].shape[1], 2)
    opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    w = torch.tensor([1.0, float((train[1] == 0).sum() / (train[1] == 1).sum())])
    for epoch in range(30):
        perm = torch.randperm(len(train[0]))
        for i in range(0, len(perm), 1024):
            b = perm[i:i + 1024]
            loss = torch.nn.functional.cross_entropy(head(train[0][b]), train[1][b], weight=w)
            opt.zero_grad()
            loss.backward()
            opt.step()
    head.eval()
    with torch.no_grad():
        logits = head(val[0])
    s = logits[:, 1] - logits[:, 0]
    pred = (s > 0).long()
    bal = 0.5 * (float((pred[val[1] == 1] == 1).float().mean()) + float((pred[val[1] == 0] == 0).float().mean()))
    return auc(s, val[1]), bal


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="NAME=CHECKPOINT", help="label and detectron2 checkpoint")
    p.add_argument("--block", type=int, default=-1, help="ViT block whose output is probed (default: the last)")
    a = p.parse_args()
    torch.set_num_threads(2)
    train_files, val_files = config_datasets(CONFIG)
    for spec in a.runs:
        name, ckpt = spec.split("=", 1)
        model, cfg = build_detector(CONFIG, ckpt, ["model.backbone.net.pretrain_img_size=96"])
        augs = [instantiate(x) for x in cfg.dataloader.test.mapper.augmentations]
        fmt = cfg.dataloader.test.mapper.get("image_format", "BGR")
        train = token_set(model, DetectorObjects(*train_files, augs, fmt), a.block)
        val = token_set(model, DetectorObjects(*val_files, augs, fmt), a.block)
        a_, b_ = probe(train, val)
        print(f"{name} block {a.block}: objectness AUC {a_:.3f}, balanced acc {b_:.3f} (val tokens {len(val[1])}, "
              f"inside {float(val[1].float().mean()):.2f})", flush=True)


if __name__ == "__main__":
    main()
