"""Run detectron2 v0.6 (the registry's Python-only pb1-detectron2) on today's numpy, Pillow and torch.

Nothing here edits installed files, and nothing happens when a complete detectron2 (with its
compiled `detectron2._C`) is installed: then `apply()` returns without touching anything.

With the Python-only v0.6:
- numpy 1.24+ removed the aliases `np.int`, `np.float`, ... that v0.6 still uses (masks,
  evaluation); the missing ones are added back as the builtins they always were.
- Pillow 10 removed `Image.LINEAR`, a default argument in `detectron2.data.transforms`;
  it was always a name for `Image.BILINEAR`.
- `detectron2.layers.deform_conv` imports `detectron2._C` at module level, so without the
  extension `import detectron2.layers` fails. A stand-in module is registered whose every
  function raises an error naming the cause. Deformable conv, rotated boxes and the fast COCO
  evaluator need the extension; COCO evaluation uses the pycocotools path instead
  (`COCOEvaluator(..., use_fast_impl=HAS_EXTENSION)`).
"""
from __future__ import annotations

import importlib.util
import sys
import types

__all__ = ["HAS_EXTENSION", "apply", "MissingExtensionError"]


class MissingExtensionError(RuntimeError):
    pass


def _has_extension() -> bool:
    try:
        return importlib.util.find_spec("detectron2._C") is not None
    except ImportError:  # detectron2 itself missing
        return False


HAS_EXTENSION = _has_extension()
_applied = False


class _MissingExtension(types.ModuleType):
    """Stand-in for `detectron2._C`: importable, but every operator says why it cannot run."""

    def __init__(self) -> None:
        super().__init__("detectron2._C")
        self.__file__ = "<missing detectron2._C>"

    @staticmethod
    def get_compiler_version() -> str:  # read by detectron2.utils.collect_env
        return "none: Python-only detectron2 (no C++ extension)"

    @staticmethod
    def get_cuda_version() -> str:
        return "none"

    @staticmethod
    def has_cuda() -> bool:
        return False

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise MissingExtensionError(
            f"detectron2._C.{name} is unavailable: this detectron2 is the Python-only v0.6 "
            "(pb1-detectron2) without its C++/CUDA extension, so deformable conv, rotated boxes and "
            "the fast COCO evaluator cannot run; build detectron2 from source (docs/install.md, 'GPU route')"
        )


def apply() -> None:
    """Make a Python-only detectron2 v0.6 importable and runnable; no-op with a full build."""
    global _applied
    if _applied or HAS_EXTENSION:
        return
    _applied = True

    import numpy as np
    from PIL import Image

    for alias, builtin in (("bool", bool), ("int", int), ("float", float), ("complex", complex),
                           ("object", object), ("str", str)):
        if alias not in np.__dict__:
            setattr(np, alias, builtin)
    if not hasattr(Image, "LINEAR"):
        Image.LINEAR = Image.Resampling.BILINEAR

    if importlib.util.find_spec("detectron2") is not None:
        sys.modules.setdefault("detectron2._C", _MissingExtension())
