#!/usr/bin/env python
"""MAE / CrossMAE pretraining on SLURM through submitit (MAE's submitit_pretrain.py): the launcher's flags, then any
pretraining flag of tools/main_pretrain.py.

    python tools/submitit_pretrain.py --nodes 8 --ngpus 8 --partition learn --timeout 4320 \
        --config configs/pretrain/crossmae_vit_base_800ep.yaml --data_path /data/imagenet --batch_size 64 \
        --output_dir runs/vitb800

Before the time limit or on preemption the run saves its position and requeues itself; it continues with
--resume auto (docs/pretraining.md#multi-node-and-slurm).
"""
import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from pretrain.cluster import slurm_executor, submit
from pretrain.errors import command
from pretrain.training.config import build_parser, load_config


def launcher_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("submitit_pretrain.py", add_help=False,
                                description="Submit MAE / CrossMAE pretraining to SLURM through submitit; every "
                                            "other flag is a pretraining flag (listed below).")
    p.add_argument("-h", "--help", action="store_true", help="show this help, then the pretraining flags")
    p.add_argument("--nodes", type=int, default=1, help="nodes to ask for (default 1)")
    p.add_argument("--ngpus", type=int, default=8, help="GPUs per node, one process each (default 8)")
    p.add_argument("--partition", default="", help="SLURM partition (default: the cluster's)")
    p.add_argument("--timeout", type=int, default=4320, help="time limit of one job, in minutes (default 4320)")
    p.add_argument("--job_dir", help="submitit's logs and job files (default OUTPUT_DIR/submitit)")
    return p


@command
def main(argv: Sequence[str] | None = None) -> None:
    launcher = launcher_parser()
    args, rest = launcher.parse_known_args(argv)
    if args.help:
        print(launcher.format_help() + "\npretraining flags:\n" + build_parser().format_help())
        return
    cfg = load_config(rest)
    job_dir = args.job_dir or str(Path(cfg["output_dir"]) / "submitit")
    executor = slurm_executor(job_dir, args.nodes, args.ngpus, args.partition, args.timeout)
    job = submit(cfg, executor)
    print(f"submitted job {job.job_id}: {args.nodes} node(s) x {args.ngpus} GPU(s); logs in {job_dir}")


if __name__ == "__main__":
    sys.exit(main())
