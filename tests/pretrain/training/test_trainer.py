"""The pretraining trainer (`pretrain.training.trainer`): exact resume, divergence stops before a save, snapshots,
`--init_from`, and no silent overwrite or loss: a used output folder is refused, a kill or Ctrl-C at any point
keeps the last finished epoch, leftover temporary files are cleaned, unusable output folders are one-line errors."""
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pretrain import cli as pretrain_cli
from pretrain import files as files_mod
from pretrain.errors import CheckpointError, ConfigError
from pretrain.models import create_model
from pretrain.runlock import run_lock
from pretrain.training import run_folder, trainer
from pretrain.training.run_folder import Interrupted, read_log
from pretrain.training.trainer import TrainingDiverged, run, seed_epoch
from pretrain.weights.fit import encoder_state_dict


@pytest.mark.slow  # three trainings, over 3 s
@pytest.mark.parametrize("model", ["crossmae_vit_tiny_patch16", "mae_vit_tiny_patch16"])
def test_resume_logs_same_losses(tmp_path, model, tiny_cfg):
    full = tiny_cfg(tmp_path / "a", model=model, epochs=3)
    run(full)
    part = tiny_cfg(tmp_path / "b", model=model, epochs=1)
    run(part)
    run({**part, "epochs": 3, "resume": "auto"})
    a, b = read_log(Path(full["output_dir"])), read_log(Path(part["output_dir"]))
    assert [r["epoch"] for r in b] == [0, 1, 2]
    np.testing.assert_allclose([r["train_loss"] for r in b], [r["train_loss"] for r in a], rtol=1e-6)
    assert a[0]["train_loss"] != a[2]["train_loss"]  # the comparison is not between constants


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch, tiny_cfg):
    cfg = tiny_cfg(tmp_path, epochs=1)
    run(cfg)
    good = torch.load(Path(cfg["output_dir"]) / "checkpoint-last.pth", weights_only=True)
    real = trainer.create_model

    def nan_model(c):
        m = real(c)
        m.register_forward_hook(lambda mod, inputs, out: out._replace(loss=out.loss * float("nan")))
        return m

    monkeypatch.setattr(trainer, "create_model", nan_model)
    with pytest.raises(TrainingDiverged, match="loss is nan at epoch 1.*kept checkpoint .* is from epoch 0"):
        run({**cfg, "epochs": 2, "resume": "auto"})
    after = torch.load(Path(cfg["output_dir"]) / "checkpoint-last.pth", weights_only=True)
    assert after["epoch"] == good["epoch"] == 0


def test_snapshots_hold_the_step_zero_weights_and_later_ones(tmp_path, tiny_cfg):
    cfg = tiny_cfg(tmp_path, epochs=3, snapshot_every=2)
    run(cfg)
    snaps = sorted((Path(cfg["output_dir"]) / "snapshots").glob("step-*.pth"))
    per_epoch = 16 // 4
    assert [p.name for p in snaps] == [f"step-{s:07d}.pth" for s in (0, 2 * per_epoch, 3 * per_epoch)]
    first = torch.load(snaps[0], weights_only=True)
    assert set(first) == {"model", "step", "epoch", "config"} and first["step"] == 0
    torch.manual_seed(0)
    seed_epoch(cfg["seed"], -1, 0)
    fresh = create_model(cfg).state_dict()
    assert all(torch.equal(fresh[k], v) for k, v in first["model"].items())  # step 0 is the untrained model
    last = torch.load(snaps[-1], weights_only=True)["model"]
    final = torch.load(Path(cfg["output_dir"]) / "checkpoint-last.pth", weights_only=True)["model"]
    assert all(torch.equal(final[k], v) for k, v in last.items())


def test_init_from_starts_another_method_from_the_same_encoder(tmp_path, tiny_cfg):
    mae = tiny_cfg(tmp_path / "mae", model="mae_vit_tiny_patch16", epochs=1, snapshot_every=1)
    run(mae)
    step0 = Path(mae["output_dir"]) / "snapshots" / "step-0000000.pth"
    cross = tiny_cfg(tmp_path / "cross", epochs=1, snapshot_every=1, init_from=str(step0))
    run(cross)
    a = torch.load(step0, weights_only=True)["model"]
    b = torch.load(Path(cross["output_dir"]) / "snapshots" / "step-0000000.pth", weights_only=True)["model"]
    encoder = [k for k in b if k.startswith(("blocks.", "patch_embed.", "cls_token", "pos_embed"))]
    assert encoder and all(torch.equal(a[k], b[k]) for k in encoder)
    assert not torch.equal(a["mask_token"], b["mask_token"]) or a["mask_token"].shape != b["mask_token"].shape
    bad = tiny_cfg(tmp_path / "bad", epochs=1, init_from=str(step0), model_kwargs={**mae["model_kwargs"], "depth": 3})
    with pytest.raises(CheckpointError, match="lacks encoder tensors"):
        run(bad)


def test_the_same_seed_alone_starts_mae_and_crossmae_from_different_encoders(tmp_path, tiny_cfg):
    # why the fair comparison of docs/pretraining.md passes --init_from: each model builds its decoder, which draws
    # from the RNG differently, before the shared init draws the encoder
    states = []
    for model in ("mae_vit_tiny_patch16", "crossmae_vit_tiny_patch16"):
        cfg = tiny_cfg(tmp_path, model=model)
        seed_epoch(cfg["seed"], -1, 0)  # the trainer's seeding before it creates the model
        states.append(encoder_state_dict(create_model(cfg).state_dict())[0])
    mae, cross = states
    differ = {k for k in cross if not torch.equal(mae[k], cross[k])}
    assert {"cls_token", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.weight"} <= differ


# ------------------------------------------------------------------------------------------ no silent overwrite or loss

def _recipe(tmp_path: Path, tiny_cfg, **kw) -> str:
    """The tiny config as a recipe file (without its output folder), for runs through the command line."""
    cfg = tiny_cfg(tmp_path, **kw)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({k: cfg[k] for k in ("model", "model_kwargs", "decoder_depth", "input_size",
                                                          "batch_size", "epochs", "warmup_epochs", "builtin_size",
                                                          "num_workers", "device", "seed", "blr", *kw)}))
    return str(recipe)


def test_a_used_output_folder_is_refused_unless_resumed_or_overwritten(tmp_path, capsys, tiny_cfg, one_error_line):
    cfg = tiny_cfg(tmp_path, epochs=1)
    run(cfg)
    before = (Path(cfg["output_dir"]) / "checkpoint-last.pth").read_bytes()
    flags = ["--model", cfg["model"], "--output_dir", cfg["output_dir"], "--device", "cpu"]
    capsys.readouterr()
    assert pretrain_cli.pretrain(flags) == 2
    one_error_line("holds an earlier run", "--resume auto", "--overwrite")
    assert (Path(cfg["output_dir"]) / "checkpoint-last.pth").read_bytes() == before
    run({**cfg, "overwrite": True, "seed": 4})
    log = (Path(cfg["output_dir"]) / "log.txt").read_text().splitlines()
    assert len(log) == 1  # the earlier run's lines are gone, not mixed in


@pytest.mark.slow  # three trainings, over 3 s
def test_a_kill_before_the_epoch_is_marked_done_loses_nothing(tmp_path, monkeypatch, tiny_cfg):
    full = tiny_cfg(tmp_path / "a", epochs=3, save_every=1, snapshot_every=1)
    run(full)
    part = tiny_cfg(tmp_path / "b", epochs=3, save_every=1, snapshot_every=1)
    real = files_mod.save_atomic

    def killed_at_epoch_1_last(obj, path):
        if Path(path).name == "checkpoint-last.pth" and obj["epoch"] == 1:
            raise KeyboardInterrupt  # as a kill right after the numbered checkpoint, snapshot and log line
        real(obj, path)

    monkeypatch.setattr(run_folder, "save_atomic", killed_at_epoch_1_last)
    with pytest.raises(Interrupted, match="in epoch 1: the kept checkpoint .* is from epoch 0"):
        run(part)
    monkeypatch.undo()
    run({**part, "resume": "auto"})
    out_a, out_b = Path(full["output_dir"]), Path(part["output_dir"])
    logs = [[json.loads(line) for line in (o / "log.txt").read_text().splitlines()] for o in (out_a, out_b)]
    assert [r["epoch"] for r in logs[1]] == [0, 1, 2]  # epoch 1 redone, logged once
    np.testing.assert_allclose([r["train_loss"] for r in logs[1]], [r["train_loss"] for r in logs[0]], rtol=1e-6)
    assert sorted(p.name for p in out_b.glob("checkpoint-*.pth")) == sorted(p.name for p in out_a.glob("checkpoint-*.pth"))


def test_a_loss_spike_stops_before_the_diverged_epoch_is_saved(tmp_path, monkeypatch, tiny_cfg):
    cfg = tiny_cfg(tmp_path, epochs=3, builtin_size=96, loss_spike_factor=10.0)
    real = trainer.create_model
    calls = {"n": 0}

    def blowing_up(c):
        m = real(c)

        def hook(mod, inputs, out):
            calls["n"] += 1
            return out._replace(loss=out.loss * 4.8e7) if calls["n"] > 30 else out  # epoch 1 (24 per epoch)
        m.register_forward_hook(hook)
        return m

    monkeypatch.setattr(trainer, "create_model", blowing_up)
    with pytest.raises(trainer.TrainingDiverged, match=r"median.*epoch 1.*kept checkpoint .*checkpoint-last.pth is "
                                                      r"from epoch 0"):
        run(cfg)
    ckpt = torch.load(Path(cfg["output_dir"]) / "checkpoint-last.pth", weights_only=True)
    assert ckpt["epoch"] == 0 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_resume_past_the_last_epoch_says_the_run_is_complete(tmp_path, caplog, tiny_cfg):
    cfg = tiny_cfg(tmp_path, epochs=1)
    run(cfg)
    result = run({**cfg, "resume": "auto"})
    assert result["complete"] and "already complete" in caplog.text and "raise --epochs" in caplog.text


def test_leftover_temporary_files_are_cleaned(tmp_path, tiny_cfg):
    # (the converter's half of this check: tests/detection/test_convert.py)
    cfg = tiny_cfg(tmp_path, epochs=1)
    out = Path(cfg["output_dir"])
    out.mkdir(parents=True)
    (out / ".checkpoint-last.pth.abc123.tmp").write_bytes(b"half")
    run(cfg)
    assert not list(out.glob(".*.tmp"))


def test_ctrl_c_keeps_the_checkpoint_says_where_and_exits_130(tmp_path, monkeypatch, tiny_cfg, one_error_line):
    real = trainer.train_one_epoch

    def interrupted(*args, **kwargs):
        if args[5] == 1:  # epoch
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_one_epoch", interrupted)
    out = tmp_path / "run"
    assert pretrain_cli.pretrain(["--config", _recipe(tmp_path, tiny_cfg), "--output_dir", str(out)]) == 130
    one_error_line("interrupted in epoch 1", "is from epoch 0", "--resume auto")
    assert torch.load(out / "checkpoint-last.pth", weights_only=True)["epoch"] == 0


@pytest.mark.parametrize("case", ["file", "unwritable"])
def test_unusable_output_folders_are_one_line(case, tmp_path, one_error_line):
    target = tmp_path / "out"
    if case == "file":
        target.write_text("x")
        needle = "is a file"
    else:
        tmp_path.chmod(0o500)
        needle = "cannot be written"
        if os.access(tmp_path, os.W_OK):  # root ignores permissions: a path under a file cannot be made instead
            tmp_path.chmod(0o700)
            (tmp_path / "f").write_text("x")
            target = tmp_path / "f" / "out"
    try:
        assert pretrain_cli.pretrain(["--output_dir", str(target), "--device", "cpu"]) == 2
    finally:
        tmp_path.chmod(0o700)
    one_error_line(needle)


def test_a_second_run_into_a_folder_in_use_is_refused_with_the_holders_pid(tmp_path, tiny_cfg, one_error_line):
    out = tmp_path / "run"
    with run_lock(out):  # as the first run holds it
        assert pretrain_cli.pretrain(["--config", _recipe(tmp_path, tiny_cfg), "--output_dir", str(out)]) == 2
    one_error_line("--output_dir", "in use by another run", f"PID {os.getpid()}")
    assert [p.name for p in out.iterdir()] == [".lock"]  # nothing of the second run was written


def test_a_folder_of_numbered_checkpoints_is_a_run_that_resume_auto_continues(tmp_path, tiny_cfg, caplog,
                                                                              one_error_line):
    first = tiny_cfg(tmp_path / "a", epochs=1)
    run(first)
    out = tmp_path / "b"
    out.mkdir()
    shutil.copy(Path(first["output_dir"]) / "checkpoint-0.pth", out)  # a numbered checkpoint, nothing else
    recipe = _recipe(tmp_path, tiny_cfg)
    assert pretrain_cli.pretrain(["--config", recipe, "--output_dir", str(out)]) == 2
    one_error_line("holds an earlier run (checkpoint-0.pth)", "--resume auto", "--overwrite")
    assert [p.name for p in out.glob("*.pth")] == ["checkpoint-0.pth"]
    result = run({**first, "output_dir": str(out), "epochs": 2, "resume": "auto"})
    assert [s["epoch"] for s in result["epochs"]] == [1]
    assert f"resuming from {out / 'checkpoint-0.pth'} (epoch 0 done) at epoch 1" in caplog.text
    caplog.clear()
    run({**first, "output_dir": str(tmp_path / "new"), "resume": "auto"})
    assert f"--resume auto: no checkpoint in {tmp_path / 'new'}, starting a new run" in caplog.text


# ------------------------------------------------------------------------------------------ divergence from iteration 0

def test_resuming_a_healthy_run_with_an_absurd_lr_stops_at_once_and_keeps_its_checkpoint(tmp_path, tiny_cfg,
                                                                                           one_error_line):
    out, recipe = tmp_path / "run", _recipe(tmp_path, tiny_cfg, epochs=1)
    assert pretrain_cli.pretrain(["--config", recipe, "--output_dir", str(out)]) == 0
    healthy = (out / "checkpoint-last.pth").read_bytes()
    assert pretrain_cli.pretrain(["--config", recipe, "--output_dir", str(out), "--resume", "auto", "--epochs", "2",
                                  "--blr", "1e3"]) == 2
    # the resumed run's first loss is compared with the losses stored in the checkpoint, its second is the first
    # after an update at lr 16
    one_error_line("median", "epoch 1, iteration 1", "kept checkpoint", "is from epoch 0", "lower --blr")
    assert (out / "checkpoint-last.pth").read_bytes() == healthy and len(read_log(out)) == 1


def test_a_fresh_run_that_blows_up_stops_in_its_first_epoch_with_nothing_saved(tmp_path, tiny_cfg):
    cfg = tiny_cfg(tmp_path, blr=1e3)
    with pytest.raises(TrainingDiverged, match="epoch 0, iteration [1-3];.*no checkpoint was written yet"):
        run(cfg)
    assert not list(Path(cfg["output_dir"]).glob("checkpoint-*.pth"))


def test_checkpoints_keep_the_guards_losses_and_older_ones_without_them_still_resume(tmp_path, tiny_cfg):
    cfg = tiny_cfg(tmp_path, epochs=1)
    run(cfg)
    last = Path(cfg["output_dir"]) / "checkpoint-last.pth"
    ckpt = torch.load(last, weights_only=True)
    assert len(ckpt["loss_window"]) == 4 and all(0.5 < x < 2 for x in ckpt["loss_window"])  # 4 iterations
    del ckpt["loss_window"]
    torch.save(ckpt, last)
    assert [s["epoch"] for s in run({**cfg, "epochs": 2, "resume": "auto"})["epochs"]] == [1]


# ------------------------------------------------------------------------------------------ Ctrl-C and SIGTERM

def test_ctrl_c_during_a_checkpoint_write_says_what_was_kept(tmp_path, monkeypatch, tiny_cfg, one_error_line):
    real = run_folder.save_atomic

    def interrupted(obj, path):
        if Path(path).name == "checkpoint-last.pth" and obj["epoch"] == 1:
            raise KeyboardInterrupt
        real(obj, path)

    monkeypatch.setattr(run_folder, "save_atomic", interrupted)
    out = tmp_path / "run"
    assert pretrain_cli.pretrain(["--config", _recipe(tmp_path, tiny_cfg), "--output_dir", str(out)]) == 130
    one_error_line("interrupted in epoch 1", f"kept checkpoint {out / 'checkpoint-last.pth'} is from epoch 0",
                   "--resume auto")


def test_sigterm_keeps_the_checkpoint_says_where_and_exits_143(tmp_path, monkeypatch, tiny_cfg, one_error_line):
    real = trainer.train_one_epoch

    def terminated(*args, **kwargs):
        if args[5] == 1:  # epoch
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    def unhandled(*_):
        raise AssertionError("SIGTERM reached the default handling, which ends the process without a word")

    monkeypatch.setattr(trainer, "train_one_epoch", terminated)
    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        out = tmp_path / "run"
        assert pretrain_cli.pretrain(["--config", _recipe(tmp_path, tiny_cfg), "--output_dir", str(out)]) == 143
    finally:
        signal.signal(signal.SIGTERM, previous)
    one_error_line("terminated (SIGTERM) in epoch 1", "is from epoch 0", "--resume auto")
    assert torch.load(out / "checkpoint-last.pth", weights_only=True)["epoch"] == 0


def test_overwrite_never_deletes_the_checkpoint_it_starts_from(tmp_path, tiny_cfg):
    run(tiny_cfg(tmp_path, epochs=1, warmup_epochs=0))
    last = tmp_path / "run" / "checkpoint-last.pth"
    before = last.read_bytes()
    with pytest.raises(ConfigError, match="--overwrite would delete .*checkpoint-last.pth, which this run reads"):
        run(tiny_cfg(tmp_path, epochs=1, warmup_epochs=0, overwrite=True, init_from=str(last)))
    assert last.read_bytes() == before
