"""Sharded training data: an ImageFolder written as webdataset tar shards with an index, and the pretraining stream
over them, built from webdataset's own pieces.

A shard holds samples `<key>.<ext>` (the image file's original bytes; ext jpg, png, ...) and `<key>.cls` (the class
index in ImageFolder's sorted-class order); `shards.json` beside the shards lists each shard's sample count and the
classes, so an epoch's length is known without reading a tar. `write_shards` shuffles the samples (seeded) before
cutting them into shards, so that a shard is not one class.

Reading (`ShardedImages`, `ShardLoader`): each epoch the shard list is shuffled by (seed, epoch), split by rank
(`webdataset.split_by_node`) and then by DataLoader worker (`webdataset.split_by_worker`); each worker shuffles its
samples in a buffer seeded by (seed, epoch, rank, worker) and decodes them as the image folders are read
(`images.open_rgb`). An epoch is therefore repeatable from its start, which is where a run resumes: a stream
stopped mid-epoch restarts that epoch's stream. A sample whose image cannot be decoded, or which has no image or no
`.cls`, is skipped with a warning and counted in the `n_skipped` of the next sample its worker yields (the trainer's
`skipped_images`; one after a worker's last sample is logged only). A shard that is no readable tar stops the run
(`DataError`). Every process runs the same number of iterations: the batches that the smallest set of shards any
process can be dealt holds (see `ShardLoader`); each process needs a shard for each data-loader worker.
"""
from __future__ import annotations

import io
import json
import logging
import random
import zlib
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any, BinaryIO

import braceexpand
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, default_collate
from torchvision import datasets
from tqdm import tqdm

from ..errors import ConfigError, DataError
from ..files import check_output_file, write_atomic, write_json_atomic
from .images import open_rgb, train_transform

logger = logging.getLogger(__name__)

INDEX = "shards.json"
SHARD_EXTENSIONS = ("jpg", "png", "jpeg", "webp", "bmp", "ppm", "pgm", "tif", "tiff")  # sample image keys read
_FORMAT = 1


# ------------------------------------------------------------------------------------ writing


def _extension(path: Path) -> str:
    ext = path.suffix.lower().lstrip(".")
    return "jpg" if ext == "jpeg" else ext


def _write_tar(f: BinaryIO, samples: list[tuple[str, int]], first_key: int) -> None:
    with wds.TarWriter(f) as tar:
        for i, (path, label) in enumerate(samples):
            try:
                data = Path(path).read_bytes()
            except OSError as e:
                raise DataError(f"cannot read {path} ({e.strerror}); fix its permissions or remove it") from None
            tar.write({"__key__": f"{first_key + i:09d}", _extension(Path(path)): data, "cls": label})


def write_shards(source: str | Path, output: str | Path, shard_size: int, seed: int = 0, overwrite: bool = False,
                 prefix: str = "train") -> dict[str, Any]:
    """Write the ImageFolder `source` (`<class>/<image>`) as tar shards `output/<prefix>-NNNNNN.tar` and the index
    `output/shards.json`.

    The samples are shuffled by `seed` and cut into shards of `shard_size` (the last one may be shorter). Each shard
    is written under a temporary name and renamed into place, the index last: a folder with an index is complete.

    Args:
        source: ImageFolder root; classes are its sub-folders in sorted order, as torchvision numbers them.
        output: folder for the shards and the index (created).
        shard_size: samples per shard.
        seed: seed of the sample order.
        overwrite: replace the shards and index of an earlier conversion in `output`.
        prefix: shard file name prefix.

    Returns:
        The index written: {"format", "classes", "shards": [{"name", "samples"}], "samples", "seed"}.

    Raises:
        DataError: `source` is no folder, has no class folders or a class without images, or a file cannot be read.
        ConfigError: `shard_size` < 1, `output` holds shards (without `overwrite`), lies inside `source` or
            cannot be written.
    """
    source, output = Path(source), Path(output)
    if shard_size < 1:
        raise ConfigError(f"--shard_size must be >= 1, got {shard_size}")
    if not prefix or any(c in prefix for c in "/\\{}*?[]"):
        raise ConfigError(f"--prefix {prefix!r} is no plain file name; give one such as train")
    if not source.is_dir():
        raise DataError(f"ImageFolder {source} does not exist; give a folder holding <class>/<image>")
    if output.resolve().is_relative_to(source.resolve()):
        raise ConfigError(f"output {output} lies inside the ImageFolder {source}, where it would become a class; "
                          "give a folder outside it")
    old = sorted(output.glob(f"{prefix}-*.tar"))
    if old and not overwrite:
        raise ConfigError(f"{output} holds shards already ({old[0].name}); pass --overwrite to replace them, or give "
                          "another output folder")
    check_output_file(output / INDEX, overwrite=overwrite)
    try:
        folder = datasets.ImageFolder(str(source))
    except FileNotFoundError as e:
        raise DataError(f"no images in {source} ({str(e).splitlines()[0]}); expected {source}/<class>/<image>") \
            from None
    samples = list(folder.samples)
    random.Random(seed).shuffle(samples)
    (output / INDEX).unlink(missing_ok=True)  # the index goes first: a folder without one is incomplete
    for path in old:
        path.unlink()
    shards = []
    for n, start in enumerate(tqdm(range(0, len(samples), shard_size), desc="shards", disable=None, unit="shard")):
        chunk = samples[start:start + shard_size]
        name = f"{prefix}-{n:06d}.tar"
        write_atomic(output / name, lambda f, chunk=chunk, start=start: _write_tar(f, chunk, start))
        shards.append({"name": name, "samples": len(chunk)})
    index = {"format": _FORMAT, "classes": folder.classes, "shards": shards, "samples": len(samples), "seed": seed}
    write_json_atomic(output / INDEX, index)
    return index


# ------------------------------------------------------------------------------------ the index


def is_sharded(data_path: str) -> bool:
    """Whether `--data_path` names shards: tar files (a brace pattern such as `/data/train-{000000..000127}.tar`)
    or a folder holding `shards.json`."""
    return data_path.endswith(".tar") or (Path(data_path) / INDEX).is_file()


def read_index(folder: str | Path) -> dict[str, Any]:
    """The index `folder/shards.json` that `write_shards` wrote.

    Raises:
        DataError: no index, or one that is not an index of this format.
    """
    path = Path(folder) / INDEX
    if not path.is_file():
        raise DataError(f"no {INDEX} beside the shards in {folder}; write shards with tools/make_shards.py, whose "
                        "index gives an epoch's length")
    try:
        index = json.loads(path.read_text())
        if index["format"] != _FORMAT:
            raise ValueError(f"format {index['format']}, not {_FORMAT}")
        shards = {s["name"]: int(s["samples"]) for s in index["shards"]}
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path} is no shard index of tools/make_shards.py ({e}); write the shards again") from None
    return {**index, "counts": shards}


def shard_list(data_path: str) -> tuple[list[str], list[int], list[str]]:
    """The shards `--data_path` names, their sample counts (from the index) and the class names.

    Raises:
        DataError: no index, a shard missing from the index or from the disk, or no shards at all.
    """
    if data_path.endswith(".tar"):
        paths = [Path(p) for p in braceexpand.braceexpand(data_path)]
        folder = paths[0].parent
        index = read_index(folder)
        for path in paths:
            if path.parent != folder or path.name not in index["counts"]:
                raise DataError(f"shard {path} is not listed in {folder / INDEX}; give shards of one conversion")
    else:
        folder = Path(data_path)
        index = read_index(folder)
        paths = [folder / name for name in index["counts"]]
    if not paths:
        raise DataError(f"{folder / INDEX} lists no shards; write the shards again")
    for path in paths:
        if not path.is_file():
            raise DataError(f"shard {path} does not exist; write the shards again or give the ones present")
    return [str(p) for p in paths], [index["counts"][p.name] for p in paths], list(index["classes"])


# ------------------------------------------------------------------------------------ reading


class _Unreadable(ValueError):
    """A sample whose image cannot be decoded, or which lacks its image or its `.cls`."""


def _decode(sample: dict[str, Any]) -> tuple[Image.Image, int]:
    """A webdataset sample as (8-bit RGB PIL image, class index), decoded as the image folders are read."""
    where = f"sample {sample.get('__key__')} of {sample.get('__url__')}"
    ext = next((e for e in SHARD_EXTENSIONS if e in sample), None)
    if ext is None or "cls" not in sample:
        raise _Unreadable(f"{where} has no {'image' if ext is None else '.cls'}")
    try:
        return open_rgb(io.BytesIO(sample[ext])), int(sample["cls"])
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise _Unreadable(f"{where}: {e}") from None


class _Skips:
    """The webdataset handler of unreadable samples: logs and counts each (`take` hands the count on once); any
    other error propagates."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, exn: Exception) -> bool:
        if not isinstance(exn, _Unreadable):
            raise exn
        logger.warning("skipping unreadable %s", exn)
        self.count += 1
        return True

    def take(self) -> int:
        count, self.count = self.count, 0
        return count


def _shard_error(exn: Exception) -> bool:
    """The webdataset handler of a shard that cannot be opened or read as a tar: the run stops in one line."""
    words = [a for a in exn.args if isinstance(a, str)]  # webdataset appends the shard's url to the arguments
    where, what = (f"shard {words[-1]}", words[0]) if len(words) > 1 else ("a shard", str(exn))
    raise DataError(f"{where} cannot be read ({' '.join(what.split())}); write the shards again") from None


class ShardedImages(IterableDataset):
    """Webdataset shards as a stream of (image tensor, n_skipped), shuffled and split per epoch (module docstring).

    Args:
        urls: the shard files.
        counts: samples in each shard (from the index).
        transform: applied to each PIL image.
        seed: seed of the shard order and of the sample shuffle, with the epoch (`set_epoch`).
        shuffle_buffer: samples in each worker's shuffle buffer (0: none).
    """

    def __init__(self, urls: list[str], counts: list[int], transform: Callable, seed: int = 0,
                 shuffle_buffer: int = 2000) -> None:
        self.urls, self.counts, self.transform = list(urls), list(counts), transform
        self.seed, self.shuffle_buffer, self.epoch = seed, shuffle_buffer, 0

    def __len__(self) -> int:
        return sum(self.counts)

    def __repr__(self) -> str:
        return f"ShardedImages(shards={len(self.urls)}, samples={len(self)}, shuffle_buffer={self.shuffle_buffer})"

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_urls(self) -> list[str]:
        """All shards in this epoch's order, the same on every process."""
        urls = list(self.urls)
        random.Random(f"shards/{self.seed}/{self.epoch}").shuffle(urls)
        return urls

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        skips = _Skips()
        stream = wds.WebDataset(self.epoch_urls(), shardshuffle=False, nodesplitter=wds.split_by_node,
                                workersplitter=wds.split_by_worker, handler=_shard_error, empty_check=False)
        stream = stream.shuffle(self.shuffle_buffer, seed=f"samples/{self.seed}/{self.epoch}/{rank}/{worker}")
        for i, (image, _) in enumerate(stream.map(_decode, handler=skips)):
            # each sample's random crop and flip are drawn from its own seed, a function of its place in this
            # process's stream: the same in a run resumed inside the epoch, whatever else drew from torch's RNG
            # between samples (masks, webdataset's batching reads one sample ahead)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(zlib.crc32(f"{self.seed}/{self.epoch}/{rank}/{worker}/{i}".encode()))
                sample = self.transform(image)
            yield sample, skips.take()

    def head(self, n: int, transform: Callable) -> list[tuple[torch.Tensor, int]]:
        """The first `n` readable samples in index order through `transform`, as (tensor, 0): fixed images for
        figures, read in this process alone."""
        stream = wds.WebDataset(self.urls, shardshuffle=False, nodesplitter=None, workersplitter=None,
                                handler=_shard_error, empty_check=False).map(_decode, handler=_Skips())
        return [(transform(image), 0) for image, _ in islice(stream, n)]


class ShardLoader:
    """The training loader over `ShardedImages`: `iterations` whole batches an epoch on every process.

    Workers batch their own samples; the main process re-batches them, so that only a process's last partial batch
    is left out. `iterations` is what the smallest set of shards a process can be dealt holds (the `len(urls) //
    world` smallest shards), so no process runs out and all step together; with equal shards that divide evenly
    among processes and batches it is every sample. A process that still runs short (unreadable samples) reads its
    shards of the epoch again from the start until it has its batches.

    Raises:
        ConfigError: fewer shards a process than DataLoader workers, or a process group that webdataset does not see.
        DataError: fewer samples a process than one batch.
    """

    def __init__(self, dataset: ShardedImages, batch_size: int, world: int, num_workers: int,
                 pin_memory: bool = False) -> None:
        self.dataset, self.batch_size, self.num_workers, self.pin_memory = dataset, batch_size, num_workers, pin_memory
        self.world = world
        seen = wds.utils.pytorch_worker_info()[1]  # what webdataset's split by rank reads (RANK, WORLD_SIZE)
        if seen != world:
            raise ConfigError(f"webdataset sees {seen} process(es) where the run has {world}; start the processes "
                              "with torchrun, which sets RANK and WORLD_SIZE")
        per_process = len(dataset.urls) // world
        if per_process < max(1, num_workers):
            raise ConfigError(f"{len(dataset.urls)} shards cannot feed {world} process(es) x {max(1, num_workers)} "
                              "data-loader worker(s) (each needs a shard); lower --num_workers or write more, "
                              "smaller shards (--shard_size)")
        least = sum(sorted(dataset.counts)[:per_process])
        self.iterations = least // batch_size
        if self.iterations < 1:
            raise DataError(f"a process may be dealt {per_process} shard(s) of only {least} samples, fewer than one "
                            f"batch of {batch_size}; lower --batch_size or write smaller shards")
        unread = len(dataset) - self.iterations * batch_size * world
        if unread:
            logger.info("shards: %d of %d samples an epoch are left out (%d shards of unequal size or number among "
                        "%d process(es), batches of %d)", unread, len(dataset), len(dataset.urls), world, batch_size)

    skip = 0  # batches of this epoch taken before a stop (`set_epoch`)

    def __len__(self) -> int:
        return self.iterations - self.skip

    def set_epoch(self, epoch: int, done: int = 0) -> None:
        """Read epoch `epoch`'s stream; `done`: samples of it (over all processes) taken before a stop, whose batches
        `iter` reads and drops, so the rest of the epoch is what an unbroken run reads next."""
        self.dataset.set_epoch(epoch)
        self.skip = min(done // (self.batch_size * self.world), self.iterations)

    def _one_pass(self) -> Iterator[list[torch.Tensor]]:
        batches = wds.DataPipeline(self.dataset, wds.batched(self.batch_size, collation_fn=default_collate))
        loader = wds.WebLoader(batches, batch_size=None, num_workers=self.num_workers)
        loader = loader.unbatched().batched(self.batch_size, collation_fn=default_collate, partial=False)
        # pinned after the re-batching, which copies
        return iter(loader.map(lambda b: [t.pin_memory() for t in b]) if self.pin_memory else loader)

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        """The epoch's batches after the `skip` first, which are read and dropped here, before the caller restores
        its RNG states: the stream and the workers' seeds are then those of an unbroken epoch."""
        batches = self._batches()
        for _ in range(self.skip):
            next(batches)
        return batches

    def _batches(self) -> Iterator[list[torch.Tensor]]:
        done = 0
        while done < self.iterations:
            before = done
            for batch in islice(self._one_pass(), self.iterations - done):
                yield batch
                done += 1
            if done == before:
                raise DataError(f"no readable batch in this process's shards of epoch {self.dataset.epoch} "
                                f"({len(self.dataset.urls)} shards); check the shards")


def open_shards(data_path: str, input_size: int, seed: int = 0, shuffle_buffer: int = 2000,
                transform: Callable | None = None) -> ShardedImages:
    """The pretraining stream over the shards `--data_path` names (`is_sharded`; see `shard_list`), with MAE's
    training transform unless `transform` is given.

    Raises:
        DataError: as `shard_list`.
    """
    urls, counts, _ = shard_list(data_path)
    return ShardedImages(urls, counts, transform or train_transform(input_size), seed, shuffle_buffer)
