"""FSDP2, activation checkpointing and sharded checkpoint folders (`pretrain.training.sharding`, `pretrain.sharded`):
checkpointed blocks give the same loss and gradients; a folder round-trips every tensor of model and optimizer; a
killed save leaves the previous checkpoint as the one resumed; a folder exports the same files as a single-file
checkpoint of the same weights; a hostile index runs no code. Two-process runs: FSDP2 against DDP, and a folder
saved by two processes resumed by one."""
import os
import pickle
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from detection.convert import convert_checkpoint
from pretrain import sharded
from pretrain.errors import CheckpointError, ConfigError
from pretrain.files import read_checkpoint
from pretrain.models import create_model
from pretrain.training.checkpoint import LAST_SHARDED, checkpoint_epoch, resolve_resume
from pretrain.training.config import load_config
from pretrain.training.engine import SpikeGuard, _forward_backward
from pretrain.training.optim import build_optimizer
from pretrain.training.sharding import checkpoint_activations, resume_sharded, save_run_state
from pretrain.training.run_folder import prepare_output_dir, read_log
from pretrain.training.trainer import run
from pretrain.weights.loading import export_encoder

ROOT = Path(__file__).resolve().parents[3]


def _model_and_optimizer(cfg: dict, seed: int = 0, steps: int = 1):
    torch.manual_seed(seed)
    model = create_model(cfg)
    optimizer = build_optimizer(model, 1e-3, 0.05)
    for _ in range(steps):  # optimizer state worth checking
        model(torch.randn(2, 3, 32, 32)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def _loss_and_grads(model, imgs, noise):
    model.zero_grad()
    loss = model(imgs, noise).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["crossmae_vit_tiny_patch16", "mae_vit_tiny_patch16"])
def test_activation_checkpointing_same_loss_and_gradients(tmp_path, tiny_cfg, name):
    cfg = tiny_cfg(tmp_path, model=name)
    torch.manual_seed(0)
    plain = create_model(cfg)
    wrapped = create_model(cfg)
    wrapped.load_state_dict(plain.state_dict())
    checkpoint_activations(wrapped)
    assert sum("checkpoint" in type(m).__name__.lower() for m in wrapped.modules()) == 4  # 2 encoder + 2 decoder
    assert list(wrapped.state_dict()) == list(plain.state_dict())  # checkpoints keep their keys
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    loss_a, grads_a = _loss_and_grads(plain, imgs, noise)
    loss_b, grads_b = _loss_and_grads(wrapped, imgs, noise)
    assert torch.equal(loss_a, loss_b)
    names = [n.replace("._checkpoint_wrapped_module", "") for n in grads_b]
    assert names == list(grads_a) and len(names) > 20
    for a, b in zip(grads_a.values(), grads_b.values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_folder_round_trips_model_and_optimizer(tmp_path, tiny_cfg):
    cfg = tiny_cfg(tmp_path)
    model, optimizer = _model_and_optimizer(cfg, seed=0, steps=2)
    save_run_state(tmp_path / LAST_SHARDED, model, optimizer, 4, {"model": cfg["model"]}, [1.5, 1.25])
    fresh, fresh_opt = _model_and_optimizer(cfg, seed=1, steps=1)
    meta = resume_sharded(tmp_path / LAST_SHARDED, fresh, fresh_opt, cfg["model"])
    assert meta["epoch"] == 4 and meta["loss_window"] == [1.5, 1.25] and meta["world_size"] == 1
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k
    saved, loaded = optimizer.state_dict(), fresh_opt.state_dict()
    assert saved["param_groups"] == loaded["param_groups"]
    for i, state in saved["state"].items():
        for key, value in state.items():
            assert torch.equal(value, loaded["state"][i][key]), (i, key)
    with pytest.raises(CheckpointError, match="was trained as"):
        resume_sharded(tmp_path / LAST_SHARDED, fresh, fresh_opt, "mae_vit_tiny_patch16")


def test_killed_save_keeps_previous_checkpoint(tmp_path, tiny_cfg, monkeypatch):
    cfg = tiny_cfg(tmp_path)
    model, optimizer = _model_and_optimizer(cfg)
    last = tmp_path / LAST_SHARDED
    save_run_state(last, model, optimizer, 0, {"model": cfg["model"]}, [])

    def killed(*args, **kwargs):
        raise KeyboardInterrupt
    with monkeypatch.context() as m:  # killed while the shards are written
        m.setattr(sharded.FileSystemWriter, "write_data", killed)
        with pytest.raises(KeyboardInterrupt):
            save_run_state(last, model, optimizer, 1, {"model": cfg["model"]}, [])
    assert resolve_resume("auto", tmp_path) == last and checkpoint_epoch(last) == 0
    assert sharded.staging(last).exists()  # a leftover the next run removes
    prepare_output_dir(tmp_path, resuming=True, overwrite=False)
    assert not sharded.staging(last).exists() and checkpoint_epoch(last) == 0

    real_replace, calls = os.replace, []

    def replace_then_die(src, dst):  # killed between the two renames of the swap: the old folder moved aside
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(src, dst)
    with monkeypatch.context() as m:
        m.setattr(sharded.os, "replace", replace_then_die)
        with pytest.raises(KeyboardInterrupt):
            save_run_state(last, model, optimizer, 1, {"model": cfg["model"]}, [])
    assert not last.exists()
    kept = resolve_resume("auto", tmp_path)
    assert kept == sharded.previous(last) and checkpoint_epoch(kept) == 0
    save_run_state(last, model, optimizer, 2, {"model": cfg["model"]}, [])  # the next save completes the swap
    assert resolve_resume("auto", tmp_path) == last and checkpoint_epoch(last) == 2
    assert not sharded.previous(last).exists()


def test_later_epoch_of_file_and_folder_is_resumed(tmp_path, tiny_cfg):
    cfg = tiny_cfg(tmp_path)
    model, optimizer = _model_and_optimizer(cfg)
    save_run_state(tmp_path / LAST_SHARDED, model, optimizer, 3, {"model": cfg["model"]}, [])
    torch.save({"model": {}, "optimizer": {}, "epoch": 1}, tmp_path / "checkpoint-last.pth")
    assert resolve_resume("auto", tmp_path) == tmp_path / LAST_SHARDED
    torch.save({"model": {}, "optimizer": {}, "epoch": 5}, tmp_path / "checkpoint-last.pth")
    assert resolve_resume("auto", tmp_path) == tmp_path / "checkpoint-last.pth"
    # a stop inside epoch 0 saves epoch -1; a folder of the finished epoch 0 is the later one
    save_run_state(tmp_path / LAST_SHARDED, model, optimizer, 0, {"model": cfg["model"]}, [])
    torch.save({"model": {}, "optimizer": {}, "epoch": -1, "position": {}}, tmp_path / "checkpoint-last.pth")
    assert resolve_resume("auto", tmp_path) == tmp_path / LAST_SHARDED


def test_folder_exports_as_single_file(tmp_path, tiny_cfg):
    cfg = tiny_cfg(tmp_path, model="mae_vit_tiny_patch16")
    model, optimizer = _model_and_optimizer(cfg)
    folder, single = tmp_path / "checkpoint-3.dcp", tmp_path / "checkpoint-3.pth"
    save_run_state(folder, model, optimizer, 3, cfg, [])
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3, "config": cfg}, single)
    read = read_checkpoint(folder)
    assert read["epoch"] == 3 and read["config"] == cfg
    assert all(torch.equal(read["model"][k], v) for k, v in model.state_dict().items())
    assert list(read["model"]) == list(model.state_dict())
    for source in (folder, single):
        export_encoder(source, tmp_path / f"{source.suffix[1:]}-encoder.pth")
        convert_checkpoint(source, tmp_path / f"{source.suffix[1:]}-d2.pth", {})
    for kind in ("encoder", "d2"):
        a = torch.load(tmp_path / f"dcp-{kind}.pth", weights_only=True)
        b = torch.load(tmp_path / f"pth-{kind}.pth", weights_only=True)
        assert list(a["model"]) == list(b["model"]) and len(a["model"]) > 10
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


class _Payload:
    """Unpickling this creates `marker`: what a hostile index would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_hostile_index_runs_no_code(tmp_path, tiny_cfg):
    cfg = tiny_cfg(tmp_path)
    model, optimizer = _model_and_optimizer(cfg)
    folder = tmp_path / "checkpoint-0.dcp"
    save_run_state(folder, model, optimizer, 0, cfg, [])
    marker = tmp_path / "PWNED"
    (folder / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError, match="checkpoint index"):
        read_checkpoint(folder)
    with pytest.raises(CheckpointError, match="checkpoint index"):
        resume_sharded(folder, model, optimizer, cfg["model"])
    # protocol 4 names a global by a dotted path from an allowed module: DCP's metadata module imports `os`
    module, name, command = (b"torch.distributed.checkpoint.metadata", b"os.system", f"touch {marker}".encode())
    text = b"".join(b"\x8c" + bytes([len(b)]) + b for b in (module, name))  # SHORT_BINUNICODE each
    (folder / ".metadata").write_bytes(b"\x80\x04" + text + b"\x93" + b"\x8c" + bytes([len(command)]) + command
                                       + b"\x85R.")
    with pytest.raises(CheckpointError, match="checkpoint index"):
        read_checkpoint(folder)
    assert not marker.exists()


def test_fsdp_with_compile_refused():
    with pytest.raises(ConfigError, match="--fsdp with --compile"):
        load_config(["--fsdp", "--compile"])


def _torchrun(tmp_path: Path, cfg: dict, *flags: str) -> None:
    recipe = tmp_path / f"{Path(cfg['output_dir']).name}.yaml"
    recipe.write_text(yaml.safe_dump({k: cfg[k] for k in ("model", "model_kwargs", "decoder_depth", "input_size",
                                                           "batch_size", "accum_iter", "epochs", "warmup_epochs", "blr",
                                                           "builtin_size", "num_workers", "output_dir", "device",
                                                           "seed", "save_every", "vis_every")}))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "tools" / "main_pretrain.py"), "--config", str(recipe), *flags],
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow  # two 2-process runs under torchrun (accumulating; FSDP2 with activation checkpointing), then
# two 1-process resumes
def test_fsdp_matches_ddp_and_resumes_on_one_process(tmp_path, tiny_cfg):
    ddp = tiny_cfg(tmp_path, batch_size=2, accum_iter=2, output_dir=str(tmp_path / "ddp"), vis_every=2)
    fsdp = {**ddp, "output_dir": str(tmp_path / "fsdp"), "fsdp": True}
    _torchrun(tmp_path, ddp)
    _torchrun(tmp_path, fsdp, "--fsdp", "--activation_checkpointing", "--snapshot_every", "2")
    losses = {name: [r["train_loss"] for r in read_log(cfg["output_dir"])] for name, cfg in (("ddp", ddp),
                                                                                           ("fsdp", fsdp))}
    assert len(losses["fsdp"]) == 2 and losses["fsdp"][0] != losses["fsdp"][1]
    np.testing.assert_allclose(losses["fsdp"], losses["ddp"], rtol=1e-5)
    folder, single = tmp_path / "fsdp" / LAST_SHARDED, tmp_path / "ddp" / "checkpoint-last.pth"
    assert sorted(p.name for p in folder.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # sharded: 2 files
    # every tensor of the 2-process folder, loaded by one process, equals the DDP run's single file
    reference = torch.load(single, weights_only=True)
    model, optimizer = _model_and_optimizer(ddp, seed=5)
    meta = resume_sharded(folder, model, optimizer, ddp["model"])
    assert meta["epoch"] == 1 and meta["world_size"] == 2
    snapshots = sorted((tmp_path / "fsdp" / "snapshots").glob("*.pth"))  # gathered whole from the shards
    assert [p.name for p in snapshots] == ["step-0000000.pth", "step-0000004.pth"]
    snapshot = torch.load(snapshots[-1], weights_only=True)["model"]
    assert all(torch.equal(snapshot[k], v) for k, v in model.state_dict().items())
    # reduce-scatter and all-reduce round differently; AdamW turns the rounding noise of a zero gradient (the key
    # bias, to which softmax is blind) into steps of up to lr = 1.6e-4: hence the absolute tolerance of the weights
    for key, value in reference["model"].items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=1e-4, atol=2e-5, msg=key)
    loaded = optimizer.state_dict()
    assert loaded["param_groups"] == reference["optimizer"]["param_groups"]
    for i, state in reference["optimizer"]["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(loaded["state"][i][key], value, rtol=1e-3, atol=1e-6, msg=f"{i} {key}")
    # and a third epoch on one process continues both runs alike
    run({**fsdp, "epochs": 3, "resume": "auto"})
    run({**ddp, "epochs": 3, "resume": "auto"})
    third = [read_log(cfg["output_dir"])[2]["train_loss"] for cfg in (fsdp, ddp)]
    np.testing.assert_allclose(third[0], third[1], rtol=1e-5)
    assert checkpoint_epoch(tmp_path / "fsdp" / LAST_SHARDED) == 2
    assert not (tmp_path / "fsdp" / "checkpoint-last.pth").exists()  # one process with --fsdp: folders still


def test_accumulation_syncs_fsdp_gradients_only_on_the_step():
    class Recording(torch.nn.Module):  # what engine sees of an FSDP2 model: set_requires_gradient_sync
        def __init__(self) -> None:
            super().__init__()
            self.w, self.calls = torch.nn.Parameter(torch.ones(1)), []

        def set_requires_gradient_sync(self, sync: bool) -> None:
            self.calls.append(sync)

        def forward(self, imgs):
            return SimpleNamespace(loss=(self.w * imgs).mean())

    model = Recording()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for boundary in (False, False, True):
        _forward_backward(model, torch.ones(2), scaler, torch.device("cpu"), 3, boundary, False, SpikeGuard(0.0), "x")
    assert model.calls == [False, False, True]
