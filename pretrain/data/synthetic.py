"""The one procedural image renderer: textured shapes with polygon outlines on textured backgrounds.

Pretraining's built-in images (`pretrain.data.images.BuiltinImages`) and detection's built-in COCO-format
shapes set (`detection.datasets`) both draw from `render_shapes_image`, each from its own random
stream, so the two never share an image unless asked to.
"""
from __future__ import annotations

import cv2
import numpy as np

SHAPE_CATEGORIES = ("circle", "square", "triangle", "star")


def _texture(rng: np.random.Generator, size: int, cells: int, amplitude: float) -> np.ndarray:
    """Smooth colour noise: a random (cells x cells x 3) grid upsampled bicubically to (size, size, 3)."""
    grid = rng.normal(0.0, amplitude, (cells, cells, 3)).astype(np.float32)
    return cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) float32 canvas: colour gradient + blotches + distractor lines (no objects)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(0, 2 * np.pi)
    t = np.clip(0.5 + (xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle), 0, 1)[..., None]
    c0, c1 = rng.uniform(30, 225, 3), rng.uniform(30, 225, 3)
    canvas = (c0 * (1 - t) + c1 * t).astype(np.float32)
    canvas += _texture(rng, size, int(rng.integers(3, 9)), 25.0)
    for _ in range(int(rng.integers(2, 7))):  # thin lines: edges that belong to no object
        p0, p1 = rng.integers(0, size, 2), rng.integers(0, size, 2)
        color = tuple(float(c) for c in rng.uniform(0, 255, 3))
        cv2.line(canvas, (int(p0[0]), int(p0[1])), (int(p1[0]), int(p1[1])), color, int(rng.integers(1, 3)))
    return canvas


def _shape_polygon(rng: np.random.Generator, kind: str, center: np.ndarray, radius: float) -> np.ndarray:
    """(K, 2) float64 vertices (x, y) of one shape of circumradius `radius`, randomly rotated."""
    rotation = rng.uniform(0, 2 * np.pi)
    if kind == "circle":
        angles, radii = np.linspace(0, 2 * np.pi, 32, endpoint=False), np.full(32, radius)
    elif kind == "square":
        angles, radii = np.arange(4) * np.pi / 2, np.full(4, radius)
    elif kind == "triangle":
        angles, radii = np.arange(3) * 2 * np.pi / 3, np.full(3, radius)
    elif kind == "star":  # 5 points; inner radius 0.45 keeps the arms distinct from a pentagon
        angles, radii = np.arange(10) * np.pi / 5, np.tile([radius, 0.45 * radius], 5)
    else:
        raise ValueError(f"unknown shape {kind!r}; expected one of {SHAPE_CATEGORIES}")
    angles = angles + rotation
    return center + np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def render_shapes_image(rng: np.random.Generator, size: int,
                        max_objects: int = 6) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """Render one image of non-overlapping textured shapes.

    Args:
        rng: Source of all randomness; the output is a pure function of its state.
        size: Side of the square image in pixels.
        max_objects: Upper bound on the number of shapes (at least 1 is drawn).

    Returns:
        (size, size, 3) uint8 RGB image, and per shape (category index into `SHAPE_CATEGORIES`,
        (K, 2) polygon in pixel coordinates, clipped to the image).
    """
    canvas = _background(rng, size)
    objects: list[tuple[int, np.ndarray]] = []
    placed: list[tuple[np.ndarray, float]] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(20):  # rejection sampling keeps shapes disjoint, so every polygon is fully visible
            radius = rng.uniform(0.06, 0.2) * size
            center = rng.uniform(radius, size - radius, 2)
            if all(np.hypot(*(center - c)) > radius + r + 2 for c, r in placed):
                break
        else:
            continue
        kind = int(rng.integers(len(SHAPE_CATEGORIES)))
        polygon = np.clip(_shape_polygon(rng, SHAPE_CATEGORIES[kind], center, radius), 0, size - 1)
        mask = np.zeros((size, size), np.uint8)
        cv2.fillPoly(mask, [np.round(polygon).astype(np.int32)], 1)
        fill = rng.uniform(0, 255, 3).astype(np.float32) + _texture(rng, size, int(rng.integers(2, 6)), 30.0)
        canvas = np.where(mask[..., None] > 0, fill, canvas)
        placed.append((center, radius))
        objects.append((kind, polygon))
    canvas += rng.normal(0, 8.0, canvas.shape).astype(np.float32)  # sensor-like noise over edges too
    return np.clip(canvas, 0, 255).astype(np.uint8), objects


# Random streams of `render_shapes_image`, keyed (seed, stream, index): detection's two splits and
# pretraining's built-in images never share an image.
STREAMS = {"train": 0, "val": 1, "pretrain": 2}


def shapes_rng(seed: int, stream: str, index: int) -> np.random.Generator:
    """The generator that renders image `index` of `stream` (a key of `STREAMS`) under `seed`."""
    return np.random.default_rng([seed, STREAMS[stream], index])
