"""Images in: pretraining data (an ImageNet-layout folder, or the built-in procedural images), and the
image sources of the analysis tools.

Training sets yield `(image_tensor, n_skipped)`: `n_skipped` counts unreadable files replaced while
producing the sample, so the trainer can report them without ending a long run. The tools' sources
(`image_source`) yield `(image, index, readable)` with fixed masks per image (`mask_noise`).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets, transforms

from ..errors import ConfigError, DataError
from .synthetic import render_shapes_image, shapes_rng

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MAX_REPLACEMENTS = 16
_CACHE_LIMIT = 8 * 2**30  # bytes of decoded pixels that cache_images may hold
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")


def eight_bit(image: Image.Image) -> Image.Image:
    """A loaded PIL image with 8 bits a channel: 16- and 32-bit grey images (PIL modes I;16, I, F) are scaled to
    8-bit grey ("L") by their bit depth, where PIL's own `convert` clips them, so that a 16-bit PNG would come out
    white; other modes are returned as they are."""
    if not (image.mode.startswith("I;16") or image.mode in ("I", "F")):
        return image
    pixels = np.asarray(image, dtype=np.float64)
    top = 65535.0 if image.mode.startswith("I;16") or pixels.max() <= 65535 else float(pixels.max())
    if image.mode == "F":
        top = float(pixels.max()) or 1.0
    return Image.fromarray(np.clip(np.round(pixels / top * 255.0), 0, 255).astype(np.uint8), "L")


def open_rgb(path: str | Path | IO[bytes]) -> Image.Image:
    """An image file (or its bytes in a binary file object) as 8-bit RGB, deep grey images scaled by `eight_bit`.

    Raises:
        OSError, ValueError, Image.DecompressionBombError: as PIL for unreadable files.
    """
    with Image.open(path) as f:
        f.load()
        return eight_bit(f).convert("RGB")


def decode_or_none(path: Path) -> Image.Image | None:
    """`open_rgb(path)`, or None (logged with the file's path) for a file that cannot be read as an image."""
    try:
        return open_rgb(path)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        logger.warning("skipping unreadable image %s (%s)", path, e)
        return None


def first_readable(read: Callable[[int], Image.Image | None], index: int, count: int,
                   root: str | Path) -> tuple[int, Image.Image, int]:
    """The policy of every training set here for unreadable images: the first image `read` returns from `index` on
    (wrapping round `count`), as (its index, the image, how many were skipped).

    Raises:
        DataError: 16 unreadable images in a row.
    """
    for skipped in range(_MAX_REPLACEMENTS):
        i = (index + skipped) % count
        img = read(i)
        if img is not None:
            return i, img, skipped
    raise DataError(f"{_MAX_REPLACEMENTS} consecutive unreadable images from index {index} in {root}; "
                    "check the dataset")


def train_transform(input_size: int) -> transforms.Compose:
    """MAE's pretraining augmentation: RandomResizedCrop(0.2-1, bicubic) and a horizontal flip."""
    return transforms.Compose([
        transforms.RandomResizedCrop(input_size, scale=(0.2, 1.0),
                                     interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def eval_transform(input_size: int) -> transforms.Compose:
    """Deterministic resize + centre crop, for reconstruction figures."""
    return transforms.Compose([
        transforms.Resize(input_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(input_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def render_builtin_image(index: int, size: int = 256, seed: int = 0) -> np.ndarray:
    """Built-in image `index`: `pretrain.data.synthetic.render_shapes_image` on its pretraining stream, a pure
    function of (index, size, seed); (size, size, 3) uint8 RGB."""
    return render_shapes_image(shapes_rng(seed, "pretrain", index), size)[0]


class BuiltinImages(Dataset):
    """`length` procedural images (see `render_builtin_image`), rendered on the fly; (image, 0) pairs."""

    def __init__(self, length: int, transform, size: int = 256, seed: int = 0) -> None:
        self.length, self.transform, self.size, self.seed = length, transform, size, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = Image.fromarray(render_builtin_image(index, self.size, self.seed))
        return self.transform(img), 0

    def __repr__(self) -> str:
        return f"BuiltinImages(length={self.length}, size={self.size}, seed={self.seed})"


class RobustImages(Dataset):
    """Image files whose unreadable members are replaced by the next readable one; yields (image, n_skipped).

    Each replacement is logged with the file's path and counted in the returned `n_skipped`. With `cache`, every
    file is decoded once, here, and kept in memory as uint8 RGB: epochs then cost the augmentation only, which
    is what a small set (the demo's 512 images) wants and what ImageNet cannot afford.

    Args:
        files: the image files, in a fixed order.
        transform: applied to each PIL image.
        root: where they came from, for messages.
        cache: decode once and keep the pixels.
    """

    def __init__(self, files: Sequence[Path], transform, root: str | Path, cache: bool = False) -> None:
        self.files, self.transform, self.root = list(files), transform, Path(root)
        self.pixels: list[np.ndarray | None] | None = None
        if cache:
            self.pixels = []
            held = 0
            for path in self.files:
                img = decode_or_none(path)
                self.pixels.append(None if img is None else np.asarray(img))
                held += 0 if img is None else self.pixels[-1].nbytes
                if held > _CACHE_LIMIT:
                    raise ConfigError(f"--cache_images would hold more than {_CACHE_LIMIT / 2**30:.0f} GiB of decoded "
                                      f"images from {self.root}; drop it for a set this large")


    def __len__(self) -> int:
        return len(self.files)

    def _image(self, i: int) -> Image.Image | None:
        if self.pixels is None:
            return decode_or_none(self.files[i])
        return None if self.pixels[i] is None else Image.fromarray(self.pixels[i])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        _, img, skipped = first_readable(self._image, index, len(self.files), self.root)
        return self.transform(img), skipped

    def __repr__(self) -> str:
        return f"RobustImages(root={self.root}, images={len(self)}, cached={self.pixels is not None})"


def build_dataset(data_path: str, input_size: int, builtin_size: int = 2048, seed: int = 0,
                  transform=None, cache_images: bool = False) -> Dataset:
    """The training set named by `data_path`, checked before any work starts.

    Args:
        data_path: "builtin"; an ImageNet-layout root with images under `train/<class>/`; or any folder of
            images, searched recursively (e.g. COCO's train2017/, or the detection set's own train split).
        input_size: crop size of the training transform.
        builtin_size: number of images of the built-in source.
        seed: seed of the built-in source.
        transform: overrides the training transform.
        cache_images: decode the files once and keep them in memory (small sets only).

    Raises:
        DataError: the path does not exist or holds no images.
    """
    transform = transform or train_transform(input_size)
    if data_path == "builtin":
        return BuiltinImages(builtin_size, transform, seed=seed)
    root = Path(data_path)
    if not root.is_dir():
        raise DataError(f"--data_path {data_path} does not exist; give an ImageNet-layout root "
                        "(DATA/train/<class>/<image>), a folder of images, or 'builtin'")
    train = root / "train"
    if train.is_dir():
        try:
            files = [Path(p) for p, _ in datasets.ImageFolder(str(train)).samples]
        except FileNotFoundError as e:
            raise DataError(f"no images under {train} ({e}); expected train/<class>/<image>") from None
        return RobustImages(files, transform, train, cache_images)
    files = sorted(f for f in root.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"no images under {root} and no train/ folder in it; give an ImageNet-layout root "
                        "(DATA/train/<class>/<image>) or a folder of images")
    return RobustImages(files, transform, root, cache_images)


def mask_noise(indices: Sequence[int], num_patches: int, seed: int) -> torch.Tensor:
    """(N, L) masking noise, a function of (seed, image index) only: the same image gets the same
    mask whatever the batch size or device."""
    rows = [torch.rand(num_patches, generator=torch.Generator().manual_seed(seed * 1_000_003 + int(i)))
            for i in indices]
    return torch.stack(rows)


def collect_images(paths: Sequence[str | Path]) -> list[Path]:
    """Image files named by `paths`, folders searched recursively, each folder sorted by path."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            found.append(p)
        else:
            raise DataError(f"image path {p} does not exist; give image files, folders of images, or --builtin N")
    if not found:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {', '.join(map(str, paths))}")
    return found


class ImageFiles(Dataset):
    """Image files, centre-cropped and normalised; yields (image, index, readable).

    An unreadable file yields a zero image and readable=False, so one bad file skips one image
    instead of ending a long run.
    """

    def __init__(self, files: Sequence[Path], input_size: int) -> None:
        self.files, self.transform = list(files), eval_transform(input_size)
        self.input_size = input_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, bool]:
        try:
            return self.transform(open_rgb(self.files[index])), index, True
        except (OSError, ValueError, Image.DecompressionBombError):
            return torch.zeros(3, self.input_size, self.input_size), index, False

    def name(self, index: int) -> str:
        return str(self.files[index])


class Builtin(Dataset):
    """The procedural images of `render_builtin_image`, as (image, index, True)."""

    def __init__(self, length: int, input_size: int, seed: int = 0) -> None:
        self.images = BuiltinImages(length, eval_transform(input_size), seed=seed)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, bool]:
        return self.images[index][0], index, True

    def name(self, index: int) -> str:
        return f"builtin:{index}"


def image_source(paths: Sequence[str], builtin: int | None, input_size: int, seed: int = 0,
                 default_builtin: int = 8) -> ImageFiles | Builtin:
    """Files/folders in `paths`, else `builtin` (or `default_builtin`) procedural images."""
    if paths and builtin:
        raise ConfigError("give IMAGES or --builtin N, not both")
    if paths:
        return ImageFiles(collect_images(paths), input_size)
    n = builtin or default_builtin
    if n < 1:
        raise ConfigError(f"--builtin must be >= 1, got {n}")
    return Builtin(n, input_size, seed)
