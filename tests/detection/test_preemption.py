"""tools/train_net.py stopped by a preemption signal (`detection.preemption`): it finishes the iteration, saves the
checkpoint that `--resume` reads, says so in one line, and `--resume` finishes the run."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import detection  # noqa: F401  (compat layer before detectron2)
from detection import cli as detection_cli
from detection import preemption
from detection.cli import train_net
from detection.preemption import Preempted
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import SimpleTrainer

ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "configs/demo/mask_rcnn_vit_smoke_builtin.py")


def _unhandled(*_):
    raise AssertionError("the signal reached the test's handler: the run did not take it")


def _signal_during(monkeypatch, iteration: int, sig: int) -> None:
    """The process sends itself `sig` while it runs `iteration`, as a cluster does at any moment."""
    real = SimpleTrainer.run_step

    def run_step(self):
        if self.iter == iteration:
            os.kill(os.getpid(), sig)
        real(self)

    monkeypatch.setattr(SimpleTrainer, "run_step", run_step)


def _iterations(out: Path) -> list[int]:
    return [r["iteration"] for r in map(json.loads, (out / "metrics.json").read_text().splitlines())
            if "total_loss" in r]


@pytest.mark.parametrize("sig, slurm", [(signal.SIGUSR1, False), (signal.SIGTERM, True)])
def test_a_preemption_signal_saves_that_iteration_and_resume_finishes_the_run(sig, slurm, tmp_path, monkeypatch,
                                                                              one_error_line):
    if slurm:  # SIGTERM preempts inside a SLURM job; no scontrol here, and SIGTERM never requeues
        monkeypatch.setenv("SLURM_JOB_ID", "123")
    out = tmp_path / "out"
    args = ["--config-file", SMOKE, f"train.output_dir={out}", "train.max_iter=4", "train.checkpointer.period=100"]
    _signal_during(monkeypatch, 1, sig)
    previous = signal.signal(sig, _unhandled)
    try:
        assert train_net(args) == Preempted.exit_code
        assert signal.getsignal(sig) is _unhandled  # the run's handler is gone again
    finally:
        signal.signal(sig, previous)
    one_error_line(f"preempted ({signal.Signals(sig).name}) after iteration 1", str(out / "model_0000001.pth"),
                   "--resume")
    assert (out / "last_checkpoint").read_text().strip() == "model_0000001.pth"
    saved = torch.load(out / "model_0000001.pth", weights_only=True)
    assert saved["iteration"] == 1 and saved["optimizer"]["state"]
    assert _iterations(out) == [0, 1] and not (out / "model_final.pth").exists()

    assert train_net(["--resume", *args]) == 0
    assert _iterations(out) == [0, 1, 2, 3]
    assert json.loads((out / "ap.json").read_text())["iteration"] == 4
    assert torch.load(out / "model_final.pth", weights_only=True)["iteration"] == 3


def test_a_stop_on_a_periodic_checkpoint_saves_once_and_one_on_the_last_iteration_is_no_stop(tmp_path, monkeypatch):
    """The periodic checkpoint of the stop's iteration is the one kept (not rewritten in place during the grace
    time); a signal in the last iteration lets the run end and evaluate."""
    saves, real_save = [], DetectionCheckpointer.save

    def counting(self, name, **extra):
        saves.append(name)
        real_save(self, name, **extra)

    monkeypatch.setattr(DetectionCheckpointer, "save", counting)
    out = tmp_path / "out"
    args = ["--config-file", SMOKE, f"train.output_dir={out}", "train.max_iter=4", "train.checkpointer.period=2"]
    _signal_during(monkeypatch, 1, signal.SIGUSR1)  # iteration 1 ends a period of 2
    previous = signal.signal(signal.SIGUSR1, _unhandled)
    try:
        assert train_net(args) == Preempted.exit_code
        assert saves == ["model_0000001"]
        saves.clear()
        monkeypatch.undo()
        monkeypatch.setattr(DetectionCheckpointer, "save", counting)
        _signal_during(monkeypatch, 3, signal.SIGUSR1)  # the last of 4 iterations
        assert train_net(["--resume", *args]) == 0
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert json.loads((out / "ap.json").read_text())["iteration"] == 4 and "model_final" in saves


def test_sigterm_outside_slurm_is_no_preemption(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert preemption.stop_signals() == (signal.SIGUSR1,)
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    assert preemption.stop_signals() == (signal.SIGUSR1, signal.SIGTERM)


def test_workers_stopped_by_a_preemption_give_its_exit_status(monkeypatch, tmp_path):
    """With several processes, the workers of detectron2's `launch` exit with the stop's status (rank 0 printed
    the message); train_net returns it instead of a traceback."""
    def launched(*_, **__):
        raise mp.ProcessExitedException("process 1 terminated with exit code 75", error_index=1, error_pid=1,
                                        exit_code=Preempted.exit_code)

    monkeypatch.setattr(detection_cli, "launch", launched)
    args = ["--config-file", SMOKE, "--num-gpus", "2", f"train.output_dir={tmp_path}"]
    assert train_net(args) == Preempted.exit_code


_RANKS = """
import json, os, signal, sys
from types import SimpleNamespace
import torch.distributed as dist
import detection  # noqa: F401
from detection.preemption import PreemptionHook

class Saves:
    save_dir = sys.argv[1]
    def __init__(self):
        self.saved = []
    def save(self, name, **extra):
        self.saved.append([name, extra["iteration"]])
    def get_checkpoint_file(self):
        return ""

dist.init_process_group("gloo")
rank, saves = dist.get_rank(), Saves()
hook = PreemptionHook(saves)
hook.trainer = SimpleNamespace(iter=0, max_iter=20)
hook.before_train()
stopped = None
try:
    for it in range(20):
        hook.trainer.iter = it
        if rank == 1 and it == 3:  # only rank 1 is signalled, inside its iteration 3
            os.kill(os.getpid(), signal.SIGUSR1)
        hook.after_step()
except BaseException as e:
    stopped = [hook.trainer.iter, str(e)]
finally:
    hook.after_train()
with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
    json.dump({"stopped": stopped, "saved": saves.saved}, f)
dist.destroy_process_group()
"""


@pytest.mark.slow  # two processes under torchrun
def test_ranks_agree_on_the_iteration_after_one_rank_is_signalled(tmp_path):
    """A signal that reaches one rank stops every rank after the same iteration (gloo, 2 processes)."""
    script = tmp_path / "ranks.py"
    script.write_text(_RANKS)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp_path)], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["stopped"][0] == 3 and r["stopped"][1].startswith("preempted (SIGUSR1) after iteration 3: saved ")
        assert r["saved"] == [["model_0000003", 3]]  # each rank calls save; detectron2's writes on rank 0 only


@pytest.mark.parametrize("status, said", [(0, "; SLURM job 123 requeued"),
                                          (1, "; scontrol requeue 123 failed (Invalid job id specified)")])
def test_a_slurm_job_is_requeued_through_scontrol_and_a_failure_is_said(status, said, tmp_path, monkeypatch):
    calls = tmp_path / "calls"
    scontrol = tmp_path / "bin" / "scontrol"
    scontrol.parent.mkdir()
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n[ {status} = 0 ] || echo "Invalid job id specified" >&2\n'
                        f"exit {status}\n")
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{scontrol.parent}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    assert preemption._requeue() == said
    assert calls.read_text() == "requeue 123\n"
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert preemption._requeue() == "; scontrol not found, so SLURM job 123 was not requeued"
