"""Distributed pretraining (`pretrain.distributed`): two processes under torchrun with the gloo backend."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pretrain.training.run_folder import read_log

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # two processes under torchrun
def test_two_process_gloo_ddp(tmp_path, tiny_cfg):
    out = tmp_path / "ddp"
    recipe = tmp_path / "tiny.yaml"
    cfg = tiny_cfg(tmp_path, epochs=1, output_dir=str(out), batch_size=2)
    recipe.write_text(yaml.safe_dump({k: cfg[k] for k in ("model", "model_kwargs", "decoder_depth", "input_size",
                                                           "batch_size", "epochs", "warmup_epochs", "builtin_size",
                                                           "num_workers", "output_dir", "device", "seed")}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29517", str(ROOT / "tools" / "main_pretrain.py"), "--config", str(recipe)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["world_size"] == 2 and resolved["effective_batch_size"] == 4
    log = read_log(out)
    assert len(log) == 1 and np.isfinite(log[0]["train_loss"])
    ckpt = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert not any(k.startswith("module.") for k in ckpt["model"])  # saved unwrapped, loadable without DDP
