"""Check that the installed stack can run the project: one line saying what works, or a one-line error."""
from __future__ import annotations

import argparse
from collections.abc import Sequence

from pretrain.errors import UserError, command

FIX = "delete .venv and rerun 'make test' (set-up rebuilds it), or see README 'Set-up'"


class BrokenEnvironment(UserError):
    """A dependency is missing or does not work; the message names it and the fix."""


def check_environment() -> str:
    """Import torch, torchvision and detectron2's Mask R-CNN modules and run `torchvision.ops.nms` once.

    Returns:
        A one-line summary of the versions.

    Raises:
        BrokenEnvironment: the first thing that does not work.
    """
    try:
        import torch
        import torchvision
    except Exception as e:  # noqa: BLE001 - any import failure is reported the same way
        raise BrokenEnvironment(f"torch/torchvision do not import ({type(e).__name__}: {e}); {FIX}") from None
    try:
        boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], dtype=torch.float)
        keep = torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5).tolist()
        if keep != [0, 2]:
            raise RuntimeError(f"nms returned {keep}, expected [0, 2]")
    except Exception as e:  # noqa: BLE001
        raise BrokenEnvironment(f"torchvision.ops.nms fails with torch {torch.__version__} and torchvision "
                                f"{torchvision.__version__} ({type(e).__name__}: {e}): they are not matching registry "
                                f"builds; {FIX}") from None
    try:
        # imported here, not at the top: this check must report a broken detectron2 in one line, not fail to import
        import detection  # applies the v0.6 compatibility layer when needed
        import detectron2
        from detectron2.evaluation import COCOEvaluator  # noqa: F401
        from detectron2.modeling.meta_arch.rcnn import GeneralizedRCNN  # noqa: F401
        from detectron2.modeling.roi_heads import StandardROIHeads  # noqa: F401
        from detectron2.modeling.roi_heads.mask_head import MaskRCNNConvUpsampleHead  # noqa: F401
    except Exception as e:  # noqa: BLE001
        raise BrokenEnvironment(f"detectron2's Mask R-CNN modules do not import ({type(e).__name__}: {e}); "
                                f"{FIX}") from None
    build = "full build" if detection.compat.HAS_EXTENSION else "Python-only v0.6 with detection/compat.py"
    return (f"environment ok: torch {torch.__version__}, torchvision {torchvision.__version__}, "
            f"detectron2 {detectron2.__version__} ({build})")


@command
def main(argv: Sequence[str] | None = None) -> None:
    """Check that the installed stack can run the project (run at the end of set-up; `make check`)."""
    argparse.ArgumentParser(description=main.__doc__).parse_args(argv)
    print(check_environment())
