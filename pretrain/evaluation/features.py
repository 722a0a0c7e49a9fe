"""Frozen features of an encoder: every patch visible, the output of one block (default the last, before any final
norm) pooled to the cls token, the mean of the patch tokens, or the whole grid of patch tokens ("spatial": the only
pooling that keeps an object's shape). Extracted in batches, sharded across processes under torchrun, and cached
per checkpoint, data, block and pooling."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..errors import ConfigError, DataError
from ..files import read_checkpoint, save_atomic
from ..models.encoder import MaskedViTEncoder

__all__ = ["POOLS", "check_feature_args", "encoder_features", "extract_features", "cached_features", "file_key"]

POOLS = ("cls", "mean", "spatial")


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
                     desc: str = "features", compile: bool = False) -> torch.Tensor:
    """Features of a whole dataset in its order, batch by batch into one preallocated (N, D) tensor.

    Memory is bounded by the output itself plus one batch. Under torchrun each process extracts every
    world-th sample and the shards are gathered, so every process returns the full tensor. `compile`
    runs `encoder_features` through `torch.compile` (the first batches compile it).
    """
    features = torch.compile(encoder_features) if compile else encoder_features
    device = device or torch.device("cpu")
    rank, world = _rank_world()
    indices = list(range(rank, len(dataset), world))
    loader = DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size, num_workers=num_workers)
    out: torch.Tensor | None = None
    start = 0
    encoder.eval().to(device)
    for imgs, _ in tqdm(loader, desc=desc, unit="batch", disable=None if rank == 0 else True, leave=False,
                        dynamic_ncols=True):
        f = features(encoder, imgs.to(device), block, pool).cpu()
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


def file_key(path: str | Path) -> str:
    """A file's identity for a cache key: its resolved path, size and modification time."""
    p = Path(path).resolve()
    st = p.stat()
    return f"{p}:{st.st_size}:{st.st_mtime_ns}"


def cached_features(encoder: MaskedViTEncoder, dataset: Dataset, key: str, cache_dir: str | Path | None,
                    **kwargs: Any) -> torch.Tensor:
    """`extract_features`, read from `cache_dir` when the same `key` (checkpoint, data, block, pool) was seen."""
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
