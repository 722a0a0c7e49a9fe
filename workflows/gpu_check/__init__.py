"""The GPU readiness check (`tools/gpu_check.sh`): a few lent GPU minutes turned into the project's first GPU numbers.

Starting from a copied working tree on a machine whose Python has torch but no package registry, it runs, each
step time-limited and independent of the others (a failing step is reported, the rest still run):

1. `stack`: installs the carried wheels (`tools/gpu_wheels.sh`) into a temporary site, without network, checks the
   stack (`workflows.environment`), prints the versions and the device;
2. `pretrain`: MAE and CrossMAE through the real trainer under `torchrun --nproc_per_node 1` (ViT-B/16 at 224 px,
   bf16 on CUDA), two epochs of a few iterations: losses finite, a checkpoint written, the second epoch redone
   from the first epoch's checkpoint with the trainer's own `--resume`, its loss against the uninterrupted run's;
3. `benchmark`: `tools/benchmark.py` (MAE and CrossMAE side by side: step time, peak memory, MFU) and the
   CrossMAE / MAE ratios against the paper's 1.48x faster and 0.54x the memory;
4. `detection`: `tools/train_net.py` with the COCO ViTDet-B Mask R-CNN config at 1024 px, batch 2, on a generated
   COCO-format shapes set, a few iterations and an evaluation, once per attention path (sdpa, folded, eager), with the
   peak memory detectron2 logs;
5. `demo`: `tools/demo.py --size small` with its pretraining and detection sized to the budget left;
6. writes `benchmark_gpu.md`, `gpu_check.json` and `gpu_check.png` into the output folder, with the device,
   torch version and commit.

`--device cpu --tiny` is the dry run of the tests: the same steps and tools with tiny models and configs.
Everything runs in child processes (whose Python path holds the temporary site), so this package imports only
what the GPU machine has before the wheels are installed: `pretrain` (its errors and figure saving) and matplotlib.
`detection` and the sibling `workflows` modules run only in the children (beyond the `detection.compat` layer that
`workflows/__init__` applies). Nothing imports this package but `tools/gpu_check.sh` and its tests.

`check` holds the configuration, a step's outcome and the child-process runner; `steps` the five steps; `report`
the Markdown report and the plot; `runner` the run within the budget and `main`, the tool's command line.
"""
from .check import STEPS, CheckConfig
from .runner import main, run_check

__all__ = ["STEPS", "CheckConfig", "main", "run_check"]
