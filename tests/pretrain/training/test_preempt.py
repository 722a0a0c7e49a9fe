"""Preemption (`pretrain.training.preempt`): SIGUSR1 inside an epoch saves the position at the next optimizer step,
`--resume auto` continues inside that epoch with the same losses and weights as an uninterrupted run; the sampler
deals the rest of an epoch once to any number of processes."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from pretrain import cli as pretrain_cli
from pretrain.training import trainer
from pretrain.training.preempt import Preempted, ResumableSampler, position_for, preemption
from pretrain.training.run_folder import kept_checkpoint, read_log
from pretrain.training.trainer import run


def _recipe(tmp_path: Path, cfg: dict) -> str:
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({k: v for k, v in cfg.items() if k not in ("output_dir", "resume", "trust_pickle")}))
    return str(recipe)


def test_sigusr1_mid_epoch_saves_the_position_and_resume_auto_gives_the_same_losses_and_weights(
        tmp_path, monkeypatch, tiny_cfg, usr1_unhandled, one_error_line, signal_in_forward):
    full = tiny_cfg(tmp_path / "a", epochs=3)
    run(full)
    cfg = tiny_cfg(tmp_path / "b", epochs=3)
    out = Path(cfg["output_dir"])
    signal_in_forward(trainer, "create_model", 5)  # epoch 1 (of 4 iterations), iteration 1
    assert pretrain_cli.pretrain(["--config", _recipe(tmp_path, cfg), "--output_dir", str(out)]) == 75
    one_error_line("preempted (SIGUSR1) in epoch 1 before iteration 2", str(out / "checkpoint-last.pth"),
                   "--resume auto")
    assert signal.getsignal(signal.SIGUSR1) is usr1_unhandled  # the run's handler is gone with the run
    saved = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert saved["epoch"] == 0 and saved["position"]["epoch"] == 1 and saved["position"]["iteration"] == 2
    monkeypatch.undo()
    signal.signal(signal.SIGUSR1, usr1_unhandled)
    result = run({**cfg, "resume": "auto"})
    assert [s["epoch"] for s in result["epochs"]] == [1, 2]
    a, b = read_log(full["output_dir"]), read_log(out)
    assert [r["epoch"] for r in b] == [0, 1, 2]
    assert [r["train_loss"] for r in b] == [r["train_loss"] for r in a]
    assert a[0]["train_loss"] != a[2]["train_loss"]  # the comparison is not between constants
    wa = torch.load(Path(full["output_dir"]) / "checkpoint-last.pth", weights_only=True)["model"]
    wb = torch.load(out / "checkpoint-last.pth", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_an_epoch_end_checkpoint_still_resumes_at_the_next_epoch(tmp_path, tiny_cfg):
    cfg = tiny_cfg(tmp_path, epochs=1)
    run(cfg)
    assert "position" not in torch.load(Path(cfg["output_dir"]) / "checkpoint-last.pth", weights_only=True)
    assert [s["epoch"] for s in run({**cfg, "epochs": 2, "resume": "auto"})["epochs"]] == [1]


def test_a_signal_before_training_stops_before_the_first_epoch(tmp_path, tiny_cfg, usr1_unhandled):
    with preemption() as flag:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert flag() and flag.name() == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is usr1_unhandled
    real = trainer._build

    def signalled(*args, **kw):  # a signal during the set-up, before the first optimizer step
        os.kill(os.getpid(), signal.SIGUSR1)
        return real(*args, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "_build", signalled)
        with pytest.raises(Preempted, match=r"preempted \(SIGUSR1\) before epoch 0: no checkpoint was written yet"):
            run(tiny_cfg(tmp_path))


@pytest.mark.parametrize("before,after", [(2, 2), (2, 3), (3, 1), (1, 4)])
def test_the_rest_of_an_epoch_is_dealt_once_to_any_number_of_processes(before, after):
    data, batch, steps = list(range(23)), 2, 3
    taken = []
    for rank in range(before):
        s = ResumableSampler(data, num_replicas=before, rank=rank, seed=5)
        s.set_epoch(4)
        taken += list(s)[:steps * batch]
    done = steps * batch * before
    rest = []
    for rank in range(after):
        s = ResumableSampler(data, num_replicas=after, rank=rank, seed=5)
        s.set_epoch(4, done)
        assert len(list(s)) == len(s)
        rest.append(list(s))
    assert len({len(r) for r in rest}) == 1  # equal shares: every process runs as many iterations
    seen = taken + [i for r in rest for i in r]
    assert set(seen) == set(data)
    assert len(seen) - len(data) < max(before, after)  # repeats only as padding to equal shares
    if before == after:  # the same order as an uninterrupted epoch
        for rank in range(after):
            s = ResumableSampler(data, num_replicas=after, rank=rank, seed=5)
            s.set_epoch(4)
            assert list(s)[steps * batch:] == rest[rank]


# ------------------------------------------------------------------------------------------ two processes, torchrun

ROOT = Path(__file__).resolve().parents[3]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(recipe: str, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             str(_free_port()), str(ROOT / "tools" / "main_pretrain.py"), "--config", recipe,
                             "--output_dir", str(out), *extra], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow  # three two-process runs under torchrun
def test_two_processes_stopped_by_sigusr1_and_resumed_give_the_losses_and_weights_of_an_uninterrupted_run(
        tmp_path, tiny_cfg, torchrun_worker):
    cfg = tiny_cfg(tmp_path, epochs=3, batch_size=2, builtin_size=64)  # 16 iterations an epoch on each process
    recipe = _recipe(tmp_path, cfg)
    full, cut = tmp_path / "full", tmp_path / "cut"
    proc = _torchrun(recipe, full)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    proc = _torchrun(recipe, cut)
    while not (cut / "checkpoint-last.pth").is_file() and proc.poll() is None:  # epoch 0 is saved
        time.sleep(0.01)
    time.sleep(0.3)  # into epoch 1 (16 iterations, seconds)
    os.kill(torchrun_worker(proc.pid, 1), signal.SIGUSR1)  # one process only: the other learns it at the next step
    assert proc.wait(timeout=300) != 0
    err = proc.stderr.read()
    assert "preempted (SIGUSR1) in epoch" in err and "--resume auto" in err, err[-3000:]
    position = torch.load(cut / "checkpoint-last.pth", weights_only=True)["position"]
    assert position["epoch"] == 1 and 0 < position["iteration"] < 16 and len(position["ranks"]) == 2
    proc = _torchrun(recipe, cut, "--resume", "auto")
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    a, b = read_log(full), read_log(cut)
    assert [r["epoch"] for r in b] == [0, 1, 2]
    assert [r["train_loss"] for r in b] == [r["train_loss"] for r in a]
    wa = torch.load(full / "checkpoint-last.pth", weights_only=True)["model"]
    wb = torch.load(cut / "checkpoint-last.pth", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_another_world_size_resumes_at_the_start_of_an_accumulation_group():
    """A stop after 8 samples (world 1, batch 4, accumulation 2) continued by 2 processes: 8 // (4 x 2) = 1 iteration
    done, which would sit inside a group of 2; the position starts the group instead, so the first step is whole."""
    saved = {"epoch": 3, "iteration": 2, "samples_done": 8, "world_size": 1, "batch_size": 4,
             "ranks": [{"loss_sum": 2.5, "skipped": 1, "loss_window": [1.0, 1.25], "rng": None}]}
    first, second = (position_for(saved, rank, 2, 4, accum=2) for rank in (0, 1))
    assert (first.epoch, first.iteration, first.samples_done) == (3, 0, 8) and second.iteration == 0
    assert (first.loss_sum, first.skipped, second.loss_sum) == (2.5, 1, 0.0) and first.rng is None
    assert position_for(saved, 0, 2, 2, accum=2).iteration == 2  # 8 // (2 x 2) = 2, a group's start
    assert position_for({**saved, "samples_done": 24}, 0, 2, 4, accum=2).iteration == 2  # 3 -> 2


def test_a_stop_inside_epoch_0_is_named_so(tmp_path):
    torch.save({"model": {}, "optimizer": {}, "epoch": -1, "position": {"epoch": 0}}, tmp_path / "checkpoint-last.pth")
    assert kept_checkpoint(tmp_path) == f"the kept checkpoint {tmp_path / 'checkpoint-last.pth'} is from inside epoch 0"
