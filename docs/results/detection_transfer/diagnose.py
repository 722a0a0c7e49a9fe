"""Where between training loss and AP do pretrained detectors lose? Diagnostics of trained demo detectors.

Prints one JSON line per run, on the val split (test-time path):
  - proposal recall: share of GT boxes with a top-k test proposal at IoU >= 0.5 / 0.7, and the mean best IoU;
  - box-head classification of GT boxes fed as proposals: accuracy over the 4 classes, mean background prob;
  - detections: per image with score >= 0.05, mean top score, share of detections larger than 96^2 px;
  - losses on 16 fixed training batches: model.train() vs backbone in eval mode (no drop path).

Experiment record for docs/results/detection_transfer.md (not project code, not tested by the suite).

usage: .venv/bin/python docs/results/detection_transfer/diagnose.py RUN_DIR [RUN_DIR ...]
    (RUN_DIR: a run_detector.sh output folder holding model_final.pth)
"""
import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

import detection  # noqa: F401  (compat layer before detectron2)
from detectron2.config import instantiate
from detectron2.structures import Boxes, pairwise_iou
from detectron2.utils.events import EventStorage
from detection.lazyconfig import config_datasets
from detection.probe import DetectorObjects, build_detector

CONFIG = str(Path(__file__).resolve().parents[3] / "configs/demo/mask_rcnn_vit_tiny_builtin.py")


@torch.no_grad()
def test_path(model: torch.nn.Module, cfg: Any) -> dict[str, dict[str, float]]:
    """Proposal recall, GT-box classification and detection statistics on the val split."""
    augs = [instantiate(a) for a in cfg.dataloader.test.mapper.augmentations]
    train_files, val_files = config_datasets(CONFIG)
    out = {}
    for split, files in (("val", val_files),):
        ds = DetectorObjects(*files, augs, cfg.dataloader.test.mapper.get("image_format", "BGR"))
        recall5, recall7, best, correct, bg, n = 0, 0, [], 0, [], 0
        ndet, top, big, sizes = [], [], 0, 0
        for image, boxes, labels in ds:
            images = model.preprocess_image([{"image": image}])
            feats = model.backbone(images.tensor)
            proposals, _ = model.proposal_generator(images, feats, None)
            iou = pairwise_iou(Boxes(boxes), proposals[0].proposal_boxes)
            b = iou.max(dim=1).values
            recall5 += int((b >= 0.5).sum())
            recall7 += int((b >= 0.7).sum())
            best += b.tolist()
            n += len(boxes)
            rh = model.roi_heads
            bf = rh.box_pooler([feats[f] for f in rh.box_in_features], [Boxes(boxes)])
            scores, _ = rh.box_predictor(rh.box_head(bf))
            prob = scores.softmax(-1)
            correct += int((prob[:, :-1].argmax(-1) == labels).sum())
            bg += prob[:, -1].tolist()
            inst, _ = rh(images, feats, proposals, None)
            inst = inst[0]
            ndet.append(len(inst))
            top.append(float(inst.scores.max()) if len(inst) else 0.0)
            area = inst.pred_boxes.area()
            big += int((area > 96 ** 2).sum())
            sizes += len(inst)
        out[split] = {"recall@0.5": recall5 / n, "recall@0.7": recall7 / n, "best_iou": float(np.mean(best)),
                      "gt_cls_acc": correct / n, "gt_bg_prob": float(np.mean(bg)),
                      "dets_per_image": float(np.mean(ndet)), "top_score": float(np.mean(top)),
                      "big_det_share": big / max(sizes, 1)}
    return out


def losses(model: torch.nn.Module, cfg: Any, batches: int = 16) -> dict[str, dict[str, float]]:
    """Mean training losses on `batches` fixed batches, with the whole model in train mode and with the backbone
    in eval mode (no drop path)."""
    cfg.dataloader.train.num_workers = 0
    torch.manual_seed(123)
    loader = iter(instantiate(cfg.dataloader.train))
    data = [next(loader) for _ in range(batches)]
    res = {}
    for mode in ("train", "backbone_eval"):
        model.train()
        if mode == "backbone_eval":
            model.backbone.net.eval()
        tot = []
        with torch.no_grad(), EventStorage(0):
            for i, batch in enumerate(data):
                torch.manual_seed(i)
                ld = model(batch)
                tot.append({k: float(v) for k, v in ld.items()})
        res[mode] = {k: float(np.mean([t[k] for t in tot])) for k in tot[0]}
        res[mode]["total"] = sum(res[mode].values())
    model.eval()
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run_detector.sh output folder holding model_final.pth")
    a = p.parse_args()
    torch.set_num_threads(2)
    for run in a.runs:
        model, cfg = build_detector(CONFIG, str(Path(run) / "model_final.pth"),
                                    ["model.backbone.net.pretrain_img_size=96"])
        report = {"run": Path(run).name, **test_path(model, cfg), "losses": losses(model, cfg)}
        print(json.dumps(report))


if __name__ == "__main__":
    main()
