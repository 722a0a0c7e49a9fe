#!/usr/bin/env python
"""MAE / CrossMAE pretraining, or fine-tuning with --mode finetune, on SLURM through submitit (MAE's
submitit_pretrain.py): the launcher's flags, then any flag of tools/main_pretrain.py (or of tools/finetune.py).

    python tools/submitit_pretrain.py --nodes 8 --ngpus 8 --partition learn --timeout 4320 \
        --config configs/pretrain/crossmae_vit_base_800ep.yaml --data_path /data/imagenet --batch_size 64 \
        --output_dir runs/vitb800
    python tools/submitit_pretrain.py --mode finetune --nodes 4 --ngpus 8 --timeout 1440 \
        --config configs/finetune/vit_base.yaml --finetune runs/vitb800/checkpoint-799.pth --batch_size 32 \
        --data_path /data/imagenet --output_dir runs/vitb800_ft

Before the time limit or on preemption the run saves its position and requeues itself; it continues with
--resume auto (docs/pretraining.md#multi-node-and-slurm, docs/finetune.md).
"""
import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from pretrain.cluster import slurm_executor, submit
from pretrain.errors import command
from pretrain.finetune import config as finetune_config
from pretrain.training import config as pretrain_config

CONFIGS = {"pretrain": pretrain_config, "finetune": finetune_config}  # each: build_parser, load_config


def launcher_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("submitit_pretrain.py", add_help=False,
                                description="Submit MAE / CrossMAE pretraining (or fine-tuning) to SLURM through "
                                            "submitit; every other flag is a flag of the --mode's trainer (listed "
                                            "below).")
    p.add_argument("-h", "--help", action="store_true", help="show this help, then the --mode's flags")
    p.add_argument("--mode", choices=tuple(CONFIGS), default="pretrain",
                   help="pretrain (tools/main_pretrain.py, the default) or finetune (tools/finetune.py)")
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
    config = CONFIGS[args.mode]
    if args.help:
        print(launcher.format_help() + f"\n{args.mode} flags:\n" + config.build_parser().format_help())
        return
    cfg = config.load_config(rest)
    job_dir = args.job_dir or str(Path(cfg["output_dir"]) / "submitit")
    executor = slurm_executor(job_dir, args.nodes, args.ngpus, args.partition, args.timeout, args.mode)
    job = submit(cfg, executor, args.mode)
    print(f"submitted job {job.job_id}: {args.mode}, {args.nodes} node(s) x {args.ngpus} GPU(s); logs in {job_dir}")


if __name__ == "__main__":
    sys.exit(main())
