"""Workflows that use both pretraining and detection: the demo pipeline and its report, the benchmark,
the environment check. `pretrain` <- `detection` <- `workflows` <- `tools`: nothing here is imported below."""
import detection  # noqa: F401  (detectron2 v0.6 compatibility layer, before any detectron2 import)
