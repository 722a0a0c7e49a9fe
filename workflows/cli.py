"""Command lines of the workflows package; `tools/*.py` and the `crossmae-*` console scripts call these."""
from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence

from pretrain.errors import command


@command
def demo(argv: Sequence[str] | None = None) -> None:
    """The whole path on one machine: does a CrossMAE backbone detect as well as an MAE one, for less compute?"""
    from .demo import presets, run

    p = argparse.ArgumentParser(description=demo.__doc__)
    p.add_argument("--output", default="demo_output", help="where everything is written (default demo_output)")
    p.add_argument("--size", choices=presets(), default="tiny",
                   help="a preset of configs/demo/*.yaml: tiny (2-core CPU), small (a CUDA device), smoke "
                        "(seconds, the pipeline in miniature)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="one full run (pretraining and detection) per seed; the report gives mean ± std "
                        "(default: 0; `--seeds 0 1 2` takes three times as long)")
    p.add_argument("--pretrain-epochs", type=int, help="override the preset's pretraining epochs")
    p.add_argument("--det-iters", type=int, help="override the preset's detection iterations")
    p.add_argument("--fresh", action="store_true", help="delete OUTPUT first instead of reusing finished steps")
    a = p.parse_args(argv)
    print(run(a.output, a.size, a.seeds, a.pretrain_epochs, a.det_iters, a.fresh))


@command
def benchmark(argv: Sequence[str] | None = None) -> None:
    """MAE vs CrossMAE training cost side by side, and the ViTDet backbone's attention kernels."""
    from pretrain.models import VIT_SIZES

    from .benchmark import BenchmarkConfig, run

    p = argparse.ArgumentParser(description=benchmark.__doc__)
    p.add_argument("--size", choices=tuple(VIT_SIZES), default="base", help="encoder size (tiny for smoke runs)")
    p.add_argument("--input-size", type=int, default=224, help="image side of the main comparison")
    p.add_argument("--patch-size", type=int, default=None, help="patch side (default: the model's, 16 or 14 for huge)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per step (default: 8 on CPU, 128 on CUDA; ViTDet 1 on CPU, 2 on CUDA)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--prediction-ratios", type=float, nargs="+", default=[0.25, 0.75], help="CrossMAE prediction ratios")
    p.add_argument("--mae-decoder-depth", type=int, nargs="+", default=[8],
                   help="MAE decoder depth(s); the first is the baseline")
    p.add_argument("--crossmae-decoder-depth", type=int, nargs="+", default=[12], help="CrossMAE decoder depth(s)")
    p.add_argument("--sweep", type=int, nargs="*", default=[224, 336, 448],
                   help="further input sides for the sequence-length sweep (none: no sweep)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--output", default="output/benchmark", help="directory for the table, JSON and plot")
    p.add_argument("--compile", action="store_true", help="torch.compile the models (off by default)")
    p.add_argument("--fused-adamw", choices=("auto", "on", "off"), default="auto",
                   help="fused AdamW kernel; auto: on for CUDA (fastest there), the foreach default elsewhere")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="device bf16 dense peak for MFU (default: known for H100/H200/A100)")
    p.add_argument("--vitdet", action="store_true", help="benchmark the ViTDet backbone's sdpa vs eager attention")
    p.add_argument("--vitdet-size", type=int, default=1024, help="ViTDet input side (1024 in ViTDet; e.g. 512 on CPU)")
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = BenchmarkConfig(**vars(p.parse_args(argv)))
    run(cfg, shlex.join([".venv/bin/python", "tools/benchmark.py", *argv]))


@command
def check_env(argv: Sequence[str] | None = None) -> None:
    """Check that the installed stack can run the project (run at the end of set-up; `make check`)."""
    from .environment import check_environment

    argparse.ArgumentParser(description=check_env.__doc__).parse_args(argv)
    print(check_environment())
