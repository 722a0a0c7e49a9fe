"""SLURM launch of pretraining and fine-tuning through submitit, in the shape of MAE's `submitit_pretrain.py`: one
thin wrapper (`Trainer`) that runs the same `run` (pretraining's or fine-tuning's, the task) in every task, a
checkpoint hook that resubmits it with `--resume auto`, and submitit's own requeue.

On SLURM's signal before the time limit (USR1, which this module makes submitit ask for) or on a preemption's
SIGTERM, the run saves its position at the next optimizer step (`pretrain.training.preempt`); then `Trainer` raises
SIGUSR1 again, now to submitit's handler, which calls `Trainer.checkpoint` and requeues the job
(`submitit.core.job_environment.SignalHandler.checkpoint_and_try_requeue`); the requeued job continues inside the
epoch where the run stopped.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import submitit
from submitit.core.job_environment import SignalHandler
from submitit.helpers import DelayedSubmission, TorchDistributedEnvironment

from .cli import log_to_stderr
from .errors import ConfigError, UserError, one_line
from .finetune.trainer import run as run_finetune
from .training.preempt import Preempted
from .training.trainer import run

LAUNCH_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)  # a time limit's warning, a preemption's stop
RUNS = {"pretrain": run, "finetune": run_finetune}  # a task's run, whose logger has the task's name


class Trainer:
    """What every SLURM task runs: one process of the run `cfg` of `task` ("pretrain" or "finetune", a key of
    `RUNS`; rank and world from SLURM, through submitit's `TorchDistributedEnvironment`), which submitit requeues
    through `checkpoint`."""

    def __init__(self, cfg: dict[str, Any], task: str = "pretrain") -> None:
        if task not in RUNS:
            raise ConfigError(f"no SLURM task {task!r}; use one of {sorted(RUNS)}")
        self.cfg, self.task = cfg, task

    def __call__(self) -> dict[str, Any]:
        # each task sees all of its node's GPUs and picks LOCAL_RANK's (`pretrain.distributed.init_distributed`)
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        log_to_stderr(self.task)
        log = logging.getLogger(self.task)
        try:
            return RUNS[self.task](self.cfg, preempt_signals=LAUNCH_SIGNALS)
        except Preempted as e:
            if int(os.environ.get("RANK", "0")):
                return None  # a task that fails could end the job step before the first one has requeued it
            log.warning("%s", e)  # the job's log says where the run stopped; the requeued job continues there
            if _submitit_handles(signal.SIGUSR1):
                signal.raise_signal(signal.SIGUSR1)  # submitit: checkpoint(), requeue, and the main task exits
            raise
        except UserError as e:  # one line in the job's log, as a command line says it
            log.error("error: %s", one_line(e))
            raise

    def checkpoint(self) -> DelayedSubmission:
        """The resubmission submitit requeues: the same run, continued with `--resume auto`."""
        return DelayedSubmission(Trainer({**self.cfg, "resume": "auto"}, self.task))


def _submitit_handles(signum: int) -> bool:
    """Whether submitit's job handler is the one `signum` reaches (not so in a DebugExecutor or outside a job)."""
    return isinstance(getattr(signal.getsignal(signum), "__self__", None), SignalHandler)


def slurm_executor(job_dir: str | Path, nodes: int, ngpus: int, partition: str, timeout: int,
                   task: str = "pretrain") -> submitit.Executor:
    """submitit's SLURM executor: `nodes` x `ngpus` tasks, one GPU each, `timeout` minutes, USR1 two minutes before
    (`partition` "": the cluster's default), the job named after `task`.

    Raises:
        ConfigError: no SLURM here (`sbatch` or `srun` is not on PATH).
    """
    missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
    if missing:
        raise ConfigError(f"{missing[0]} not found: this is no SLURM machine; submit from a SLURM login node, or "
                          "start the run with torchrun (docs/pretraining.md#multi-node-and-slurm)")
    executor = submitit.AutoExecutor(folder=str(job_dir), cluster="slurm", slurm_max_num_timeout=30)
    executor.update_parameters(nodes=nodes, tasks_per_node=ngpus, gpus_per_node=ngpus, cpus_per_task=10,
                               mem_gb=40 * ngpus, timeout_min=timeout, slurm_signal_delay_s=120,
                               name=f"crossmae_{task}", slurm_additional_parameters={"signal": "USR1@120"},
                               **({"slurm_partition": partition} if partition else {}))
    return executor


def submit(cfg: dict[str, Any], executor: submitit.Executor, task: str = "pretrain") -> submitit.Job:
    """Submit the run `cfg` of `task` (its output folder made absolute: the job may start elsewhere), with
    `--resume auto` unless it names a checkpoint.

    Sets SUBMITIT_PREEMPT_SIGNAL=USR1 in this process's environment, which the job inherits: its submitit, imported
    there afresh, then binds its requeue handler to USR1.
    """
    os.environ["SUBMITIT_PREEMPT_SIGNAL"] = "USR1"
    # --resume auto unless a checkpoint is named: a job SLURM requeues for a node failure, before any checkpoint()
    # call, or the same command submitted again, continues the run instead of refusing its folder
    cfg = {**cfg, "output_dir": str(Path(cfg["output_dir"]).resolve()), "resume": cfg.get("resume") or "auto"}
    return executor.submit(Trainer(cfg, task))
