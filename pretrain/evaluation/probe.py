"""Frozen-feature evaluation of a pretrained encoder: k-NN (DINO's) and a linear probe (MAE's protocol).

- Features: `pretrain.evaluation.features` (one block's output, pooled to the cls token, the mean or the grid).
- `knn_classify`: cosine similarity to every training feature, the k = 20 nearest vote with weights
  exp(similarity / 0.07), as DINO's `eval_knn.py`.
- `linear_probe`: BatchNorm without affine, then a linear head (MAE's `main_linprobe.py`), trained with SGD or
  LARS (momentum 0.9, lr = blr * batch / 256, linear warm-up, then cosine). It trains on fixed features (no
  augmentation), where MAE's protocol augments every epoch; at ImageNet scale that makes the number comparable
  in spirit, not to the digit, with the 67.8 / 76.0 / 77.2 of MAE's released ViT-B/L/H.
- Data: `pretrain.evaluation.objects` (an ImageFolder split, or the objects of a COCO-format set cropped to the
  encoder's input).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.optim import Lars
from torch.utils.data import Dataset

from ..distributed import distributed_session, resolve_device
from ..errors import ConfigError, DataError
from ..training.schedule import set_lr, warmup_cosine
from ..weights.loading import load_encoder
from ..weights.releases import resolve_weights
from .features import cached_features, check_feature_args, file_key
from .health import encoder_health

HEALTH_SAMPLES = 64  # val images whose tokens the feature-health statistics are taken over

__all__ = ["knn_classify", "LinearHead", "linear_probe", "accuracy", "chance_levels", "chance_text", "score_features",
           "probe_summary", "run_probe"]


def knn_classify(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, num_classes: int,
                 k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """DINO's weighted k-NN: cosine similarities, the k nearest training samples vote exp(sim / T) each.

    Args:
        train: (N, D) training features; train_labels (N,) class indices.
        test: (M, D) features to classify.
        num_classes: number of classes.
        k: neighbours (at most N).
        temperature: T of the vote weights.
        chunk: test rows per similarity matrix, bounding memory to chunk x N.

    Returns:
        (M,) predicted class indices.
    """
    train = F.normalize(train.float(), dim=1)
    k = min(k, len(train))
    preds = []
    for i in range(0, len(test), chunk):
        sim = F.normalize(test[i:i + chunk].float(), dim=1) @ train.T
        top, idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(sim), num_classes).scatter_add_(1, train_labels[idx], (top / temperature).exp())
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


class LinearHead(nn.Sequential):
    """MAE's probe head: BatchNorm1d without affine (eps 1e-6), then a linear layer (weights trunc-normal 0.01)."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
        nn.init.trunc_normal_(self[1].weight, std=0.01)
        nn.init.zeros_(self[1].bias)


def linear_probe(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, num_classes: int,
                 epochs: int = 100, batch_size: int = 256, blr: float = 0.1, weight_decay: float = 0.0,
                 warmup_epochs: int = 10, optimizer: str = "sgd", seed: int = 0,
                 device: torch.device | None = None) -> torch.Tensor:
    """Train MAE's linear probe head on fixed features; returns the (M,) predictions for `test`.

    `optimizer` is "sgd" (momentum 0.9) or "lars" (timm's LARS with MAE's trust ratio on the weight, none on the
    bias). lr = blr * batch_size / 256; linear warm-up over `warmup_epochs`, then cosine to 0, per iteration.
    """
    if optimizer not in ("sgd", "lars"):
        raise ConfigError(f"--optimizer {optimizer!r} is neither sgd nor lars")
    if len(train) < 2:
        raise DataError(f"a linear probe needs at least 2 training samples, got {len(train)}")
    device = device or torch.device("cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        head = LinearHead(train.shape[1], num_classes).to(device)
    train, train_labels = train.to(device), train_labels.to(device)
    lr = blr * batch_size / 256
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9,
                                                     weight_decay=weight_decay)
    else:
        opt = Lars([{"params": [head[1].weight], "always_adapt": True, "weight_decay": weight_decay},
                    {"params": [head[1].bias], "weight_decay": 0.0}], lr=lr, momentum=0.9)
    per_epoch = math.ceil(len(train) / batch_size)
    total, warmup = epochs * per_epoch, warmup_epochs * per_epoch
    step = 0
    head.train()
    for _ in range(epochs):
        order = torch.randperm(len(train), generator=generator)
        for i in range(0, len(train), batch_size):
            batch = order[i:i + batch_size].to(device)
            if len(batch) < 2:  # BatchNorm needs two samples
                continue
            set_lr(opt, warmup_cosine(step, warmup, total, lr))
            loss = F.cross_entropy(head(train[batch].float()), train_labels[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    head.eval()
    with torch.no_grad():
        return head(test.to(device).float()).argmax(dim=1).cpu()


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of correct predictions."""
    return float((pred == labels).float().mean())


def chance_levels(train_labels: torch.Tensor, val_labels: torch.Tensor, num_classes: int) -> dict[str, float | int]:
    """What a probe scores on `val_labels` without any features, the baselines its accuracies are read against.

    Returns:
        {"uniform": 1 / num_classes (a uniform guess), "majority": the val accuracy of always answering the most
        frequent class of `train_labels` (ties: the lowest index), "majority_class": that class's index}.
    """
    majority = int(torch.bincount(train_labels, minlength=num_classes).argmax())
    return {"uniform": 1.0 / num_classes, "majority": int((val_labels == majority).sum()) / len(val_labels),
            "majority_class": majority}


def chance_text(chance: dict[str, float | int], classes: list[str]) -> str:
    """`1/4 classes 0.250, majority class 'circle' 0.400` from `chance_levels` (the class index where `classes` is
    empty)."""
    n = round(1 / chance["uniform"])
    name = repr(classes[chance["majority_class"]]) if classes else chance["majority_class"]
    return f"1/{n} classes {chance['uniform']:.3f}, majority class {name} {chance['majority']:.3f}"


def score_features(train: torch.Tensor, train_labels: torch.Tensor, val: torch.Tensor, val_labels: torch.Tensor,
                   num_classes: int, *, k: int = 20, temperature: float = 0.07, device: torch.device | None = None,
                   **linear_args: Any) -> dict[str, float]:
    """Accuracy on `val` of the k-NN classifier and of the linear probe (`linear_args`: `linear_probe`'s), both
    trained on fixed `train` features: {"knn": ..., "linear": ...}."""
    knn = knn_classify(train, train_labels, val, num_classes, k, temperature)
    linear = linear_probe(train, train_labels, val, num_classes, device=device, **linear_args)
    return {"knn": accuracy(knn, val_labels), "linear": accuracy(linear, val_labels)}


def probe_summary(results: dict[str, float]) -> str:
    """One line: `knn 0.812  linear 0.905` from {"knn": ..., "linear": ...}."""
    return "  ".join(f"{k} {v:.3f}" for k, v in results.items())


def run_probe(checkpoint: str | Path, train_set: Dataset, val_set: Dataset, data_key: str, *, model_name: str | None = None,
              block: int = -1, pool: str = "spatial", k: int = 20, temperature: float = 0.07, epochs: int = 100,
              batch_size: int = 256, blr: float = 0.1, weight_decay: float = 0.0, warmup_epochs: int = 10,
              optimizer: str = "sgd", seed: int = 0, extract_batch_size: int = 128, num_workers: int = 0,
              device: str = "auto", cache_dir: str | Path | None = None,
              trust_pickle: bool = False, compile: bool = False) -> dict[str, Any]:
    """k-NN and linear-probe accuracy of the frozen encoder of `checkpoint` on `val_set`, trained on `train_set`.

    Both datasets yield (image at the encoder's input size, class index) and carry `labels` (a tensor) and
    `classes`; `data_key` names them for the feature cache. `compile` compiles the feature forward
    (`extract_features`).

    Returns:
        A JSON-ready dict: checkpoint, model, epoch, block, pool, sample and class counts,
        {"knn": {"k", "temperature", "accuracy"}, "linear": {..., "accuracy"}}, "chance" (`chance_levels`), and
        "feature_health": the
        `pretrain.evaluation.health.encoder_health` of the embedded input and every block over up to 64 val images.
    """
    for name, value in (("k", k), ("epochs", epochs), ("batch_size", batch_size), ("extract_batch_size",
                                                                                   extract_batch_size)):
        if value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    linear_args = dict(epochs=epochs, batch_size=batch_size, blr=blr, weight_decay=weight_decay,
                       warmup_epochs=warmup_epochs, optimizer=optimizer, seed=seed)
    dev = resolve_device(device)
    with distributed_session(dev):  # under torchrun every process extracts a shard of the features
        encoder, info = load_encoder(checkpoint, model_name, trust_pickle)
        path = resolve_weights(checkpoint)  # a release name: its cached file (load_encoder fetched it)
        check_feature_args(encoder, block, pool)
        classes = list(getattr(train_set, "classes", []))
        num_classes = len(classes) or int(train_set.labels.max()) + 1
        common = dict(block=block, pool=pool, batch_size=extract_batch_size, num_workers=num_workers, device=dev,
                      compile=compile)
        base = f"{file_key(path)}|{data_key}|block={block}|pool={pool}|size={encoder.patch_embed.img_size}"
        train = cached_features(encoder, train_set, base + "|train", cache_dir, desc="train features", **common)
        val = cached_features(encoder, val_set, base + "|val", cache_dir, desc="val features", **common)
        sample = torch.stack([val_set[i][0] for i in range(min(len(val_set), HEALTH_SAMPLES))]).to(dev)
        health = encoder_health(encoder, sample)
    scores = score_features(train, train_set.labels, val, val_set.labels, num_classes, k=k, temperature=temperature,
                            device=dev, **linear_args)
    return {"checkpoint": str(checkpoint), "model": info["name"], "epoch": info["epoch"],
            "weights": info["report"].as_dict(),
            "block": block % len(encoder.blocks), "pool": pool, "feature_dim": train.shape[1],
            "train_samples": len(train), "val_samples": len(val), "classes": classes,
            "knn": {"k": k, "temperature": temperature, "accuracy": scores["knn"]},
            "linear": {**linear_args, "accuracy": scores["linear"]},
            "chance": chance_levels(train_set.labels, val_set.labels, num_classes), "feature_health": health}
