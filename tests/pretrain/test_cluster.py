"""The SLURM launcher (`pretrain.cluster`, `tools/submitit_pretrain.py`) under submitit's local executors: the same
run in a job, SIGTERM taking the preemption path and handing over to submitit's requeue, which continues the run
inside its epoch; `--help` and a refusal without SLURM; the same for fine-tuning (`--mode finetune`)."""
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import submitit
import torch

from pretrain.cluster import Trainer, slurm_executor, submit
from pretrain.errors import ConfigError
from pretrain.finetune.config import DEFAULTS as FINETUNE_DEFAULTS
from pretrain.finetune.trainer import run as run_finetune
from pretrain.training.run_folder import read_log
from pretrain.training.trainer import run

ROOT = Path(__file__).resolve().parents[2]


def test_the_job_runs_the_run_and_its_checkpoint_resubmits_it_with_resume_auto(tmp_path, tiny_cfg):
    cfg = tiny_cfg(tmp_path, epochs=1)
    with mock.patch.dict(os.environ):  # the job exports RANK, WORLD_SIZE, MASTER_ADDR, ... into this process
        job = submit(cfg, submitit.DebugExecutor(tmp_path / "jobs"))
        assert [s["epoch"] for s in job.result()["epochs"]] == [0]
    again = Trainer(cfg).checkpoint()
    assert isinstance(again.function, Trainer) and again.function.cfg == {**cfg, "resume": "auto"}


def test_the_same_command_submitted_again_continues_the_run_and_a_bad_setting_is_one_log_line(tmp_path, tiny_cfg,
                                                                                              caplog):
    cfg = tiny_cfg(tmp_path, epochs=1)
    with mock.patch.dict(os.environ):
        submit(cfg, submitit.DebugExecutor(tmp_path / "jobs")).result()
    with mock.patch.dict(os.environ):  # no --resume given: the job continues the run its folder holds
        job = submit({**cfg, "epochs": 2}, submitit.DebugExecutor(tmp_path / "jobs"))
        assert [s["epoch"] for s in job.result()["epochs"]] == [1]
    bad = tiny_cfg(tmp_path / "bad", data_path=str(tmp_path / "no_such_folder"))
    with mock.patch.dict(os.environ), caplog.at_level(logging.ERROR, logger="pretrain"):
        with pytest.raises(Exception):
            submit(bad, submitit.DebugExecutor(tmp_path / "jobs")).result()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and r.name == "pretrain"]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "no_such_folder" in errors[0]
    assert "\n" not in errors[0]


def test_help_works_without_slurm_and_submitting_without_sbatch_is_one_line(tmp_path, monkeypatch, one_error_line):
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "submitit_pretrain.py"), "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--ngpus" in proc.stdout and "--blr" in proc.stdout, proc.stderr
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch on it
    with pytest.raises(ConfigError, match="sbatch not found"):
        slurm_executor(tmp_path, 1, 8, "", 60)
    for tool in ("sbatch", "srun"):  # stand-ins: the executor only looks them up
        (tmp_path / tool).write_text("#!/bin/sh\n")
        (tmp_path / tool).chmod(0o755)
    executor = slurm_executor(tmp_path / "jobs", 2, 8, "learn", 60)
    text = executor._executor._make_submission_file_text("python -m job", "uid")  # the sbatch script it would send
    for line in ("--signal=USR1@120", "--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--time=60",
                 "--partition=learn"):
        assert line in text, text


def _task(controller: int) -> int:
    """The pid of the local job's task process (the controller's child)."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == controller:
                return int(proc.name)
        except OSError:
            continue
    raise AssertionError(f"no task under the local job's controller {controller}")


@pytest.mark.slow  # a submitit local job, started twice, and an uninterrupted run
def test_sigterm_in_a_job_saves_the_position_requeues_and_the_job_ends_as_an_uninterrupted_run(tmp_path, tiny_cfg):
    cfg = tiny_cfg(tmp_path, epochs=3, batch_size=2, builtin_size=48)  # 24 iterations an epoch
    executor = submitit.LocalExecutor(tmp_path / "jobs", max_num_timeout=3)
    executor.update_parameters(timeout_min=10, tasks_per_node=1)
    job = submit(cfg, executor)
    out = Path(cfg["output_dir"])
    while not (out / "checkpoint-last.pth").is_file() and not job.done():  # epoch 0 is saved
        time.sleep(0.01)
    time.sleep(0.3)  # into epoch 1 (24 iterations, over a second)
    os.kill(_task(job._process.pid), signal.SIGTERM)  # as SLURM does on preemption
    result = job.result()
    log = job.stderr() + job.stdout()
    assert "preempted (SIGTERM) in epoch 1 before iteration" in log and "Requeued job" in log, log[-3000:]
    assert "continuing epoch 1 after" in log
    assert [s["epoch"] for s in result["epochs"]][-1] == 2 and result["epochs"][0]["epoch"] >= 1
    full = run(tiny_cfg(tmp_path / "full", epochs=3, batch_size=2, builtin_size=48))
    assert [r["train_loss"] for r in read_log(out)] == [s["loss"] for s in full["epochs"]]
    wa = torch.load(out / "checkpoint-last.pth", weights_only=True)["model"]
    wb = torch.load(tmp_path / "full" / "run" / "checkpoint-last.pth", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _finetune_cfg(tmp_path: Path, data: Path, **kw) -> dict:
    """A 2-block ViT at 32 px fine-tuned with MAE's recipe (Mixup / CutMix, RandAugment) on CPU."""
    return {**FINETUNE_DEFAULTS, "model": "vit_tiny_patch16", "input_size": 32, "batch_size": 8, "epochs": 1,
            "model_kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8}, "warmup_epochs": 0,
            "mixup": 0.8, "cutmix": 1.0, "data_path": str(data), "output_dir": str(tmp_path / "run"),
            "num_workers": 0, "device": "cpu", **kw}


def test_a_finetune_job_fine_tunes_and_its_checkpoint_resubmits_fine_tuning(tmp_path, colour_folder):
    cfg = _finetune_cfg(tmp_path, colour_folder)
    with mock.patch.dict(os.environ):
        job = submit(cfg, submitit.DebugExecutor(tmp_path / "jobs"), "finetune")
        result = job.result()
    assert [r["epoch"] for r in result["epochs"]] == [0] and "test_acc1" in result["epochs"][0]
    assert (tmp_path / "run" / "checkpoint-best.pth").is_file()
    again = Trainer(cfg, "finetune").checkpoint().function
    assert again.task == "finetune" and again.cfg == {**cfg, "resume": "auto"}
    with pytest.raises(ConfigError, match="no SLURM task 'probe'"):
        Trainer(cfg, "probe")


def test_help_of_the_finetune_mode_lists_the_fine_tuning_flags(tmp_path, monkeypatch):
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "submitit_pretrain.py"), "--mode", "finetune",
                           "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--ngpus" in proc.stdout and "--layer_decay" in proc.stdout, proc.stderr
    for tool in ("sbatch", "srun"):  # stand-ins: the executor only looks them up
        (tmp_path / tool).write_text("#!/bin/sh\n")
        (tmp_path / tool).chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    executor = slurm_executor(tmp_path / "jobs", 1, 8, "", 60, "finetune")
    assert "--job-name=crossmae_finetune" in executor._executor._make_submission_file_text("python -m job", "uid")


@pytest.mark.slow  # a submitit local job of fine-tuning, started twice, and an uninterrupted run
def test_sigterm_in_a_finetune_job_saves_the_position_requeues_and_ends_as_an_uninterrupted_run(
        tmp_path, colour_folder):
    cfg = _finetune_cfg(tmp_path, colour_folder, epochs=3, batch_size=2)  # 32 iterations an epoch
    executor = submitit.LocalExecutor(tmp_path / "jobs", max_num_timeout=3)
    executor.update_parameters(timeout_min=10, tasks_per_node=1)
    job = submit(cfg, executor, "finetune")
    out = Path(cfg["output_dir"])
    while not (out / "checkpoint-last.pth").is_file() and not job.done():  # epoch 0 is saved
        time.sleep(0.01)
    time.sleep(0.05)  # into epoch 1 (its 32 iterations take a few tenths of a second)
    os.kill(_task(job._process.pid), signal.SIGTERM)  # as SLURM does on preemption
    result = job.result()
    log = job.stderr() + job.stdout()
    stopped = re.search(r"preempted \(SIGTERM\) in epoch (\d) before iteration", log)
    assert stopped and "Requeued job" in log, log[-3000:]
    assert f"continuing epoch {stopped[1]} after" in log
    assert result["epochs"][-1]["epoch"] == 2 and result["epochs"][0]["epoch"] == int(stopped[1])
    full = run_finetune(_finetune_cfg(tmp_path / "full", colour_folder, epochs=3, batch_size=2))
    assert [(r["train_loss"], r["test_acc1"]) for r in read_log(out)] == [
        (r["train_loss"], r["test_acc1"]) for r in full["epochs"]]
