"""Fixtures of the pretraining tests in more than one sub-folder."""
import os
import signal
from pathlib import Path

import pytest
import torch

from pretrain.models import build_model

TINY = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32, decoder_num_heads=2)


@pytest.fixture(scope="session")
def tiny_model():
    """`tiny_model(name, seed=0, **kw)`: a registered model with a 2-block, 32-wide encoder and a 2-block decoder at
    32 px (16 patches of 8 px), built under `torch.manual_seed(seed)`, in eval mode."""
    def build(name: str, seed: int = 0, **kw):
        torch.manual_seed(seed)
        return build_model(name, img_size=32, decoder_depth=2, **{**TINY, **kw}).eval()
    return build


@pytest.fixture
def usr1_unhandled():
    """SIGUSR1 outside a run's own handling fails the test (its default action would end pytest)."""
    def unhandled(*_):
        raise AssertionError("SIGUSR1 reached the default handling, which ends the process without a word")
    previous = signal.signal(signal.SIGUSR1, unhandled)
    yield unhandled
    signal.signal(signal.SIGUSR1, previous)


@pytest.fixture(scope="session")
def torchrun_worker():
    """`torchrun_worker(agent_pid, rank)`: the pid of the worker process of `rank` that torchrun's agent started."""
    def find(agent: int, rank: int) -> int:
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == agent:
                    if f"RANK={rank}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                        return int(proc.name)
            except OSError:  # a process that ended meanwhile
                continue
        raise AssertionError(f"no worker of rank {rank} under torchrun {agent}")
    return find


@pytest.fixture
def signal_in_forward(monkeypatch):
    """`signal_in_forward(module, builder, k)`: the model that `module.builder` builds sends its own process SIGUSR1
    during its k-th training forward (counted from 0), as a scheduler would at any moment; `monkeypatch.undo()`
    ends it."""
    def install(module, builder: str, k: int) -> None:
        real, calls = getattr(module, builder), [0]

        def building(*args, **kwargs):
            model = real(*args, **kwargs)

            def hook(mod, inputs):
                if mod.training:
                    if calls[0] == k:
                        os.kill(os.getpid(), signal.SIGUSR1)
                    calls[0] += 1
            model.register_forward_pre_hook(hook)
            return model

        monkeypatch.setattr(module, builder, building)
    return install
