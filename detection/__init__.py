"""ViTDet-style detectron2 backbone adapter, datasets and checkpoint hand-off.

Importing this package first makes a Python-only detectron2 v0.6 usable (see `compat`). Imports `pretrain` and
detectron2; nothing of `workflows` or `tools`.
"""
from . import compat

compat.apply()
