"""Frozen-feature evaluation of a pretrained encoder: k-NN (DINO's) and a linear probe (MAE's protocol).

- Features: the encoder sees every patch (no masking); the output of one block (default the last, before any
  final norm) is pooled to the cls token, the mean of the patch tokens, or the whole grid of patch tokens
  flattened ("spatial": the only pooling that keeps an object's shape, which mean pooling throws away).
- `knn_classify`: cosine similarity to every training feature, the k = 20 nearest vote with weights
  exp(similarity / 0.07), as DINO's `eval_knn.py`.
- `linear_probe`: BatchNorm without affine, then a linear head (MAE's `main_linprobe.py`), trained with SGD or
  LARS (momentum 0.9, lr = blr * batch / 256, linear warm-up, then cosine). It trains on fixed features (no
  augmentation), where MAE's protocol augments every epoch; at ImageNet scale that makes the number comparable
  in spirit, not to the digit, with the 67.8 / 76.0 / 77.2 of MAE's released ViT-B/L/H.
- Data: an ImageFolder (`train/`, `val/`), or the objects of a COCO-format set, each ground-truth box cropped
  and resized to the encoder's input size (`ObjectCrops`).
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from timm.optim import Lars
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets, transforms
from tqdm import tqdm

from .data import IMAGENET_MEAN, IMAGENET_STD, open_rgb
from .errors import ConfigError, DataError
from .models.encoder import MaskedViTEncoder

__all__ = ["POOLS", "ObjectCrops", "image_folder", "encoder_features", "extract_features", "knn_classify",
           "linear_probe", "accuracy"]

POOLS = ("cls", "mean", "spatial")


def _normalize() -> transforms.Normalize:
    return transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)


class ObjectCrops(Dataset):
    """Every ground-truth object of a COCO-format set as (crop, category index), crops resized to `input_size`.

    The crop is the object's box (COCO `bbox`, rounded outwards), resized without keeping the aspect ratio, as
    a detector's RoI features are. Crowd annotations and boxes under one pixel are skipped. Category indices
    follow the json's category ids in ascending order.

    Raises:
        DataError: missing or broken json, no annotations, or an annotation of an unknown category or image.
    """

    def __init__(self, json_file: str | Path, image_root: str | Path, input_size: int) -> None:
        json_file, self.image_root = Path(json_file), Path(image_root)
        if not json_file.is_file():
            raise DataError(f"annotation file {json_file} not found; give a COCO-format json")
        try:
            coco = json.loads(json_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{json_file} is not valid JSON ({e}); give a COCO-format json") from None
        if not isinstance(coco, dict) or not all(k in coco for k in ("images", "annotations", "categories")):
            raise DataError(f"{json_file} is not a COCO instances json (needs images, annotations, categories)")
        cat_ids = sorted(c["id"] for c in coco["categories"])
        self.classes = [next(c["name"] for c in coco["categories"] if c["id"] == i) for i in cat_ids]
        index_of = {cid: i for i, cid in enumerate(cat_ids)}
        files = {im["id"]: im["file_name"] for im in coco["images"]}
        self.items: list[tuple[str, tuple[int, int, int, int], int]] = []
        for ann in coco["annotations"]:
            if ann.get("iscrowd", 0):
                continue
            if ann["category_id"] not in index_of:
                raise DataError(f"{json_file}: annotation {ann.get('id')} has category {ann['category_id']}, which is "
                                "not in 'categories'; fix the json")
            if ann["image_id"] not in files:
                raise DataError(f"{json_file}: annotation {ann.get('id')} refers to image {ann['image_id']}, which "
                                "is not in 'images'; fix the json")
            x, y, w, h = ann["bbox"]
            if w < 1 or h < 1:
                continue
            box = (math.floor(x), math.floor(y), math.ceil(x + w), math.ceil(y + h))
            self.items.append((files[ann["image_id"]], box, index_of[ann["category_id"]]))
        if not self.items:
            raise DataError(f"{json_file} has no usable object annotations (non-crowd boxes of at least 1 px)")
        self.transform = transforms.Compose([transforms.Resize((input_size, input_size),
                                                               interpolation=transforms.InterpolationMode.BICUBIC),
                                             transforms.ToTensor(), _normalize()])
        self.labels = torch.tensor([c for _, _, c in self.items])

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        file_name, box, label = self.items[index]
        path = self.image_root / file_name
        try:
            crop = open_rgb(path).crop(box)
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read {path} ({e}); check the image folder") from None
        return self.transform(crop), label


def image_folder(root: str | Path, input_size: int) -> datasets.ImageFolder:
    """An ImageFolder split with MAE's evaluation transform: bicubic resize to input_size / 0.875, centre crop.

    Raises:
        DataError: the folder is missing or holds no class folders of images (labels come from the folders).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root} not found; an ImageFolder split holds <class>/<image> folders")
    tf = transforms.Compose([transforms.Resize(int(input_size / 0.875), interpolation=transforms.InterpolationMode.BICUBIC),
                             transforms.CenterCrop(input_size), transforms.ToTensor(), _normalize()])
    try:
        folder = datasets.ImageFolder(str(root), tf)
    except FileNotFoundError as e:
        raise DataError(f"{root} has no labelled images ({e}); the probe needs <class>/<image> folders") from None
    folder.labels = torch.tensor(folder.targets)
    return folder


def _pool(tokens: torch.Tensor, pool: str) -> torch.Tensor:
    """(N, 1 + L, D) block output, cls first -> (N, D') pooled features."""
    if pool == "cls":
        return tokens[:, 0]
    if pool == "mean":
        return tokens[:, 1:].mean(dim=1)
    return tokens[:, 1:].flatten(1)


def check_feature_args(encoder: MaskedViTEncoder, block: int, pool: str) -> None:
    """Raise a one-line ConfigError for a block outside the encoder or an unknown pooling."""
    depth = len(encoder.blocks)
    if not -depth <= block < depth:
        raise ConfigError(f"--block {block} is outside the encoder's {depth} blocks; use 0..{depth - 1} or -1")
    if pool not in POOLS:
        raise ConfigError(f"--pool {pool!r} is none of {POOLS}")


@torch.no_grad()
def encoder_features(encoder: MaskedViTEncoder, imgs: torch.Tensor, block: int = -1,
                     pool: str = "spatial") -> torch.Tensor:
    """Features of one batch with every patch visible.

    Args:
        encoder: an MAE / CrossMAE model or a bare `MaskedViTEncoder`, in eval mode.
        imgs: (N, 3, H, W) normalised images at the encoder's input size.
        block: encoder block whose output is taken (0-based; negative counts from the end).
        pool: "cls", "mean" or "spatial".

    Returns:
        (N, D) for cls / mean, (N, L * D) for spatial.
    """
    check_feature_args(encoder, block, pool)
    ids = torch.arange(encoder.num_patches, device=imgs.device).expand(imgs.shape[0], -1)
    feats = encoder.forward_features(imgs, ids)  # depth + 1 maps: the embedded input, then each block
    return _pool(feats[1 + block % len(encoder.blocks)].float(), pool)


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def extract_features(encoder: MaskedViTEncoder, dataset: Dataset, block: int = -1, pool: str = "spatial",
                     batch_size: int = 128, num_workers: int = 0, device: torch.device | None = None,
                     desc: str = "features") -> torch.Tensor:
    """Features of a whole dataset in its order, batch by batch into one preallocated (N, D) tensor.

    Memory is bounded by the output itself plus one batch. Under torchrun each process extracts every
    world-th sample and the shards are gathered, so every process returns the full tensor.
    """
    device = device or torch.device("cpu")
    rank, world = _rank_world()
    indices = list(range(rank, len(dataset), world))
    loader = DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size, num_workers=num_workers)
    out: torch.Tensor | None = None
    start = 0
    encoder.eval().to(device)
    for imgs, _ in tqdm(loader, desc=desc, unit="batch", disable=None if rank == 0 else True, leave=False,
                        dynamic_ncols=True):
        f = encoder_features(encoder, imgs.to(device), block, pool).cpu()
        if out is None:
            out = torch.empty(len(indices), f.shape[1])
        out[start:start + len(f)] = f
        start += len(f)
    if out is None:
        raise DataError("the dataset is empty; nothing to extract")
    if world == 1:
        return out
    shards: list[Any] = [None] * world
    dist.all_gather_object(shards, out)
    full = torch.empty(len(dataset), out.shape[1])
    for r, shard in enumerate(shards):
        full[r::world] = shard
    return full


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
            scale = step / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) /
                                                                              max(total - warmup, 1)))
            for group in opt.param_groups:
                group["lr"] = lr * scale
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


def probe_summary(results: dict[str, float]) -> str:
    """One line: `knn 0.812  linear 0.905` from {"knn": ..., "linear": ...}."""
    return "  ".join(f"{k} {v:.3f}" for k, v in results.items())


def _file_key(path: str | Path) -> str:
    p = Path(path).resolve()
    st = p.stat()
    return f"{p}:{st.st_size}:{st.st_mtime_ns}"


def cached_features(encoder: MaskedViTEncoder, dataset: Dataset, key: str, cache_dir: str | Path | None,
                    **kwargs: Any) -> torch.Tensor:
    """`extract_features`, read from `cache_dir` when the same `key` (checkpoint, data, block, pool) was seen."""
    import hashlib

    from .checkpoint import read_checkpoint, save_atomic

    if cache_dir is None:
        return extract_features(encoder, dataset, **kwargs)
    path = Path(cache_dir) / f"features-{hashlib.sha256(key.encode()).hexdigest()[:20]}.pt"
    if path.is_file():
        cached = read_checkpoint(path)
        if cached.get("key") == key and len(cached["features"]) == len(dataset):
            return cached["features"]
    feats = extract_features(encoder, dataset, **kwargs)
    if _rank_world()[0] == 0:
        save_atomic({"key": key, "features": feats}, path)
    return feats


def run_probe(checkpoint: str | Path, train_set: Dataset, val_set: Dataset, data_key: str, *, model_name: str | None = None,
              block: int = -1, pool: str = "spatial", k: int = 20, temperature: float = 0.07, epochs: int = 100,
              batch_size: int = 256, blr: float = 0.1, weight_decay: float = 0.0, warmup_epochs: int = 10,
              optimizer: str = "sgd", seed: int = 0, extract_batch_size: int = 128, num_workers: int = 0,
              device: str = "auto", cache_dir: str | Path | None = None,
              trust_pickle: bool = False) -> dict[str, Any]:
    """k-NN and linear-probe accuracy of the frozen encoder of `checkpoint` on `val_set`, trained on `train_set`.

    Both datasets yield (image at the encoder's input size, class index) and carry `labels` (a tensor) and
    `classes`; `data_key` names them for the feature cache.

    Returns:
        A JSON-ready dict: checkpoint, model, epoch, block, pool, sample and class counts, and
        {"knn": {"k", "temperature", "accuracy"}, "linear": {..., "accuracy"}}.
    """
    from .distributed import distributed_session, resolve_device
    from .releases import resolve_weights
    from .weights import load_encoder

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
        common = dict(block=block, pool=pool, batch_size=extract_batch_size, num_workers=num_workers, device=dev)
        base = f"{_file_key(path)}|{data_key}|block={block}|pool={pool}|size={encoder.patch_embed.img_size}"
        train = cached_features(encoder, train_set, base + "|train", cache_dir, desc="train features", **common)
        val = cached_features(encoder, val_set, base + "|val", cache_dir, desc="val features", **common)
    knn = knn_classify(train, train_set.labels, val, num_classes, k, temperature)
    linear = linear_probe(train, train_set.labels, val, num_classes, device=dev, **linear_args)
    return {"checkpoint": str(checkpoint), "model": info["name"], "epoch": info["epoch"],
            "weights": info["report"].as_dict(),
            "block": block % len(encoder.blocks), "pool": pool, "feature_dim": train.shape[1],
            "train_samples": len(train), "val_samples": len(val), "classes": classes,
            "knn": {"k": k, "temperature": temperature, "accuracy": accuracy(knn, val_set.labels)},
            "linear": {**linear_args, "accuracy": accuracy(linear, val_set.labels)}}
