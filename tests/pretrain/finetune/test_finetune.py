"""Fine-tuning (`pretrain.finetune`): MAE's parameter groups, loading a pretrained encoder, learning, exact resume,
evaluation of a saved checkpoint, and the one-line refusals; preemption inside an epoch; FSDP2 and activation
checkpointing (layer-decay groups on sharded parameters, a 2-process run against DDP, its folders resumed and
evaluated by one process)."""
import argparse
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import yaml
from PIL import Image
from torch.distributed.tensor import DTensor
from torchvision import transforms

from pretrain.errors import CheckpointError, ConfigError, DataError
from pretrain.finetune.config import DEFAULTS, load_config, validate
from pretrain.finetune.data import LabelledImages, build_transform, posterize
from pretrain.finetune.model import build_classifier, load_pretrained
from pretrain.finetune import trainer
from pretrain.finetune.trainer import run
from pretrain.runlock import FolderInUse, run_lock
from pretrain.training.layer_decay import param_groups_lrd
from pretrain.training.preempt import Preempted
from pretrain.training.run_folder import Interrupted, read_log
from pretrain.training.sharding import checkpoint_activations, shard

GOLDEN = Path(__file__).parents[2] / "data" / "mae_lrd_vit_base.json"
SMALL = {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8}  # the pretraining fixtures' TINY encoder


def _cfg(tmp_path: Path, data: Path, **kw) -> dict:
    """MAE's recipe (RandAugment, Mixup / CutMix, random erasing, label smoothing) on a 2-block ViT at 32 px."""
    cfg = {**DEFAULTS, "model": "vit_tiny_patch16", "model_kwargs": SMALL, "input_size": 32, "batch_size": 8,
           "epochs": 4, "warmup_epochs": 0, "blr": 1e-2, "mixup": 0.8, "cutmix": 1.0, "data_path": str(data),
           "output_dir": str(tmp_path / "run"), "num_workers": 0, "device": "cpu", **kw}
    validate(cfg)
    return cfg


@pytest.mark.parametrize("pool", ["avg", "token"])
def test_parameter_groups_of_vit_base_are_maes(pool):
    """Layer, lr scale, weight decay and order of every group equal what MAE's param_groups_lrd gives ViT-B/16."""
    model = build_classifier("vit_base_patch16", 1000, 0.1, global_pool=pool == "avg")
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups_lrd(model, 0.05, model.no_weight_decay(), layer_decay=0.65)
    ours = [{"lr_scale": g["lr_scale"], "weight_decay": g["weight_decay"],
             "params": [names[id(p)] for p in g["params"]]} for g in groups]
    golden = json.loads(GOLDEN.read_text())[pool]
    assert len(ours) == len(golden) == 28
    for mine, theirs in zip(ours, golden):
        assert mine["params"] == theirs["params"]
        assert mine["weight_decay"] == theirs["weight_decay"]
        assert mine["lr_scale"] == pytest.approx(theirs["lr_scale"], rel=1e-12)


def test_pretrained_encoder_is_loaded_resized_and_head_reinitialised(tmp_path, tiny_checkpoint):
    ckpt = tiny_checkpoint(tmp_path / "mae.pth")
    encoder = torch.load(ckpt, weights_only=True)["model"]
    model = build_classifier("vit_tiny_patch16", 5, input_size=48, **SMALL)  # 6 x 6 patches; pretrained at 4 x 4
    report = load_pretrained(model, ckpt)
    sd = model.state_dict()
    assert torch.equal(sd["blocks.1.mlp.fc2.weight"], encoder["blocks.1.mlp.fc2.weight"])
    assert torch.equal(sd["patch_embed.proj.weight"], encoder["patch_embed.proj.weight"])
    assert sd["pos_embed"].shape == (1, 1 + 36, 32) and any("pos_embed" in note for note in report.resized)
    assert set(report.missing) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    assert "decoder" in report.dropped and sd["head.weight"].std() < 1e-4  # MAE's trunc_normal_(std=2e-5)


def test_an_encoder_of_another_size_is_refused(tmp_path, tiny_checkpoint):
    ckpt = tiny_checkpoint(tmp_path / "mae.pth")
    model = build_classifier("vit_tiny_patch16", 5, input_size=32, **{**SMALL, "depth": 3})
    with pytest.raises(CheckpointError, match="lacks encoder tensors .*blocks.2"):
        load_pretrained(model, ckpt)


def test_fine_tuning_learns_and_eval_reproduces_the_recorded_accuracy(tmp_path, colour_folder, tiny_checkpoint):
    cfg = _cfg(tmp_path, colour_folder, finetune=str(tiny_checkpoint(tmp_path / "mae.pth")))
    result = run(cfg)
    chance = result["chance"]
    assert chance == {"uniform": 0.25, "majority": 0.25, "majority_class": 0}  # a tie: the first class, blue
    assert result["best_acc1"] > 2 * 100 * chance["uniform"], result["epochs"]
    best = torch.load(tmp_path / "run" / "checkpoint-best.pth", weights_only=True)
    assert best["acc1"] == best["best_acc1"] == result["best_acc1"]
    again = run({**cfg, "eval": True, "resume": str(tmp_path / "run" / "checkpoint-best.pth")})
    assert again["acc1"] == best["acc1"] and again["acc5"] == best["acc5"] and again["images"] == 32


def test_resume_repeats_an_uninterrupted_run(tmp_path, colour_folder, monkeypatch):
    run(_cfg(tmp_path / "a", colour_folder, epochs=3, warmup_epochs=1))
    interrupted = _cfg(tmp_path / "b", colour_folder, epochs=3, warmup_epochs=1)
    real = trainer.train_one_epoch

    def ctrl_c_in_epoch_2(*args, **kw):
        if args[5] == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)
    monkeypatch.setattr(trainer, "train_one_epoch", ctrl_c_in_epoch_2)
    with pytest.raises(Interrupted, match="interrupted in epoch 2: the kept checkpoint .* is from epoch 1"):
        run(interrupted)
    monkeypatch.undo()
    run({**interrupted, "resume": "auto"})
    a, b = read_log(tmp_path / "a" / "run"), read_log(tmp_path / "b" / "run")
    assert [r["epoch"] for r in b] == [0, 1, 2]
    assert [(r["train_loss"], r["test_acc1"]) for r in a] == [(r["train_loss"], r["test_acc1"]) for r in b]
    wa = torch.load(tmp_path / "a" / "run" / "checkpoint-last.pth", weights_only=True)["model"]
    wb = torch.load(tmp_path / "b" / "run" / "checkpoint-last.pth", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_eval_refuses_a_head_of_another_class_count(tmp_path, colour_folder):
    model = build_classifier("vit_tiny_patch16", 7, input_size=32, **SMALL)
    torch.save({"model": model.state_dict()}, tmp_path / "seven.pth")
    cfg = _cfg(tmp_path, colour_folder, eval=True, resume=str(tmp_path / "seven.pth"))
    with pytest.raises(CheckpointError, match="classifies 7 classes but .*val has 4"):
        run(cfg)


def test_a_dataset_without_val_is_refused(tmp_path, colour_folder):
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "train").symlink_to(colour_folder / "train")
    with pytest.raises(DataError, match="has no val/ folder"):
        run(_cfg(tmp_path, tmp_path / "only"))


@pytest.mark.parametrize("value", ["0", "1.5", "-0.5", "nan"])
def test_layer_decay_outside_0_1_is_refused(value):
    with pytest.raises(ConfigError, match="--layer_decay must be"):
        load_config(["--data_path", "x", "--layer_decay", value])


def test_posterize_keeping_no_bits_is_black_as_before_pillow_12(tmp_path):
    """rand-m9-mstd0.5-inc1 reaches magnitude 10, where timm's increasing posterize keeps 0 bits; Pillow >= 12
    raises on 0 bits, older Pillow returned black. The recipe's pipeline must do the latter."""
    pipeline = build_transform(True, {**_cfg(tmp_path, tmp_path), "reprob": 0.0})
    ops = [op for step in pipeline.transforms for op in getattr(step, "ops", ()) if op.name == "PosterizeIncreasing"]
    assert len(ops) == 1
    op = ops[0]
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0.0
    image = Image.new("RGB", (8, 8), (200, 100, 50))
    assert op(image).getextrema() == ((0, 0), (0, 0), (0, 0))
    assert posterize(image, 8) is image and posterize(image, 1).getpixel((0, 0)) == (128, 0, 0)


RECIPES = Path(__file__).parents[3] / "configs" / "finetune"


@pytest.mark.parametrize("name, model, epochs, blr, layer_decay, drop_path", [
    ("vit_small", "vit_small_patch16", 100, 5e-4, 0.65, 0.1),
    ("vit_base", "vit_base_patch16", 100, 5e-4, 0.65, 0.1),
    ("vit_large", "vit_large_patch16", 50, 1e-3, 0.75, 0.2),
    ("vit_huge", "vit_huge_patch14", 50, 1e-3, 0.75, 0.3),
])
def test_recipes_are_the_papers(name, model, epochs, blr, layer_decay, drop_path):
    """CrossMAE's README (MAE's FINETUNE.md for L and H): effective batch 1024 on 8 GPUs, MAE's regularisation."""
    cfg = load_config(["--config", str(RECIPES / f"{name}.yaml"), "--data_path", "x"])
    assert (cfg["model"], cfg["epochs"], cfg["blr"], cfg["layer_decay"], cfg["drop_path"]) == (
        model, epochs, blr, layer_decay, drop_path)
    assert cfg["batch_size"] * cfg["accum_iter"] * 8 == 1024 and cfg["warmup_epochs"] == 5
    assert (cfg["mixup"], cfg["cutmix"], cfg["reprob"], cfg["smoothing"], cfg["aa"], cfg["global_pool"]) == (
        0.8, 1.0, 0.25, 0.1, "rand-m9-mstd0.5-inc1", True)


def test_overwrite_never_deletes_the_weights_it_fine_tunes(tmp_path, colour_folder):
    run(_cfg(tmp_path, colour_folder, epochs=1))
    before = (tmp_path / "run" / "checkpoint-last.pth").read_bytes()
    with pytest.raises(ConfigError, match="--overwrite would delete .*checkpoint-last.pth, which this run reads"):
        run(_cfg(tmp_path, colour_folder, overwrite=True, finetune=str(tmp_path / "run" / "checkpoint-last.pth")))
    assert (tmp_path / "run" / "checkpoint-last.pth").read_bytes() == before


def test_a_second_run_into_the_folder_is_refused_with_the_holders_pid(tmp_path, colour_folder):
    with run_lock(tmp_path / "run", "--output_dir"):
        with pytest.raises(FolderInUse, match=f"PID {os.getpid()}"):
            run(_cfg(tmp_path, colour_folder, epochs=1))


def test_resume_reads_pickles_only_with_trust_pickle_and_says_where_it_resumes(tmp_path, colour_folder, caplog):
    cfg = _cfg(tmp_path, colour_folder, epochs=2)
    with caplog.at_level(logging.INFO, logger="finetune"):
        run({**cfg, "epochs": 1, "resume": "auto"})
    assert "--resume auto: no checkpoint in" in caplog.text
    last = tmp_path / "run" / "checkpoint-last.pth"
    torch.save({**torch.load(last, weights_only=True), "args": argparse.Namespace(lr=1.0)}, tmp_path / "old.pth")
    with pytest.raises(CheckpointError, match="--trust-pickle"):
        run({**cfg, "resume": str(tmp_path / "old.pth")})
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="finetune"):
        result = run({**cfg, "resume": str(tmp_path / "old.pth"), "trust_pickle": True})
    assert [r["epoch"] for r in result["epochs"]] == [1] and "(epoch 0 done) at epoch 1" in caplog.text


def test_eval_refuses_val_folders_other_than_the_trained_classes(tmp_path, colour_folder):
    run(_cfg(tmp_path, colour_folder, epochs=1))
    other = tmp_path / "other"
    (other / "val").mkdir(parents=True)
    for name, folder in zip(("blue", "green", "red", "purple"), sorted((colour_folder / "val").iterdir())):
        (other / "val" / name).symlink_to(folder)
    with pytest.raises(CheckpointError, match=r"other class folders than .* \(\['purple', 'yellow'\]\)"):
        run(_cfg(tmp_path, other, eval=True, resume=str(tmp_path / "run" / "checkpoint-last.pth")))


@pytest.mark.parametrize("flags, message", [(["--clip_grad", "0"], "--clip_grad must be > 0"),
                                            (["--batch_size", "7", "--mixup", "0.8"], "--batch_size 7 is odd")])
def test_settings_that_would_silently_fail_are_refused(flags, message):
    with pytest.raises(ConfigError, match=message):
        load_config(["--data_path", "x", *flags])


def test_an_unreadable_image_is_replaced_by_the_next_with_its_label(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "0.png").write_bytes(b"not an image")
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "b" / "0.png")
    images = LabelledImages(tmp_path, transforms.ToTensor())
    image, label = images[0]
    assert label == 1 and image[0].mean() == 1.0  # b's red image, with b's label


# ------------------------------------------------------------------------------------------------ preemption

def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = (torch.load(p, weights_only=True)["model"] for p in (a, b))
    return list(wa) == list(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sigusr1_mid_epoch_saves_the_position_and_resume_auto_repeats_an_uninterrupted_run(
        tmp_path, colour_folder, monkeypatch, usr1_unhandled, signal_in_forward):
    """Mixup / CutMix, RandAugment, random erasing and drop path all draw from the RNGs the position saves."""
    full = _cfg(tmp_path / "a", colour_folder, epochs=3, warmup_epochs=1)
    run(full)
    cfg = _cfg(tmp_path / "b", colour_folder, epochs=3, warmup_epochs=1)
    out = tmp_path / "b" / "run"
    signal_in_forward(trainer, "build_classifier", 8 + 3)  # 64 images / batch 8: epoch 1, iteration 3
    with pytest.raises(Preempted, match=r"^preempted \(SIGUSR1\) in epoch 1 before iteration 4: saved .*"
                                        r"checkpoint-last.pth; continue with --resume auto$") as stopped:
        run(cfg)
    assert stopped.value.exit_code == 75  # EX_TEMPFAIL, as pretraining's
    assert signal.getsignal(signal.SIGUSR1) is usr1_unhandled  # the run's handler is gone with the run
    saved = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert saved["epoch"] == 0 and saved["position"]["epoch"] == 1 and saved["position"]["iteration"] == 4
    assert saved["best_acc1"] == read_log(out)[0]["test_acc1"] and "acc1" not in saved  # weights not evaluated
    monkeypatch.undo()
    result = run({**cfg, "resume": "auto"})
    assert [r["epoch"] for r in result["epochs"]] == [1, 2]
    a, b = read_log(tmp_path / "a" / "run"), read_log(out)
    assert [r["epoch"] for r in b] == [0, 1, 2]
    keys = ("train_loss", "test_loss", "test_acc1")
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]
    assert a[0]["train_loss"] != a[2]["train_loss"]  # the comparison is not between constants
    for name in ("checkpoint-last.pth", "checkpoint-best.pth"):
        assert _same_weights(tmp_path / "a" / "run" / name, out / name), name
    top = max(r["test_acc1"] for r in a)
    best = [torch.load(d / "run" / "checkpoint-best.pth", weights_only=True) for d in (tmp_path / "a", tmp_path / "b")]
    assert best[0]["epoch"] == best[1]["epoch"] == max(r["epoch"] for r in a if r["test_acc1"] == top)  # MAE: >=
    assert [(c["acc1"], c["best_acc1"]) for c in best] == [(top, top)] * 2


def test_a_signal_in_the_first_epoch_resumes_inside_it(tmp_path, colour_folder, monkeypatch, usr1_unhandled,
                                                        signal_in_forward):
    cfg = _cfg(tmp_path, colour_folder, epochs=1)
    signal_in_forward(trainer, "build_classifier", 1)
    with pytest.raises(Preempted, match=r"in epoch 0 before iteration 2"):
        run(cfg)
    assert torch.load(tmp_path / "run" / "checkpoint-last.pth", weights_only=True)["best_acc1"] == 0.0
    monkeypatch.undo()
    assert [r["epoch"] for r in run({**cfg, "resume": "auto"})["epochs"]] == [0]
    assert (tmp_path / "run" / "checkpoint-best.pth").is_file()


# ------------------------------------------------------------------------------------------------ FSDP2

def test_layer_decay_groups_are_the_same_on_checkpointed_sharded_parameters(tmp_path):
    plain = build_classifier("vit_tiny_patch16", 4, input_size=32, **SMALL)
    wrapped = build_classifier("vit_tiny_patch16", 4, input_size=32, **SMALL)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        checkpoint_activations(wrapped)
        shard(wrapped, torch.device("cpu"))
        assert isinstance(wrapped.blocks[0].mlp.fc1.weight, DTensor)
        described = []
        for model in (plain, wrapped):
            names = {id(p): n.replace("._checkpoint_wrapped_module", "") for n, p in model.named_parameters()}
            groups = param_groups_lrd(model, 0.05, model.no_weight_decay(), 0.75)
            described.append([(g["lr_scale"], g["weight_decay"], [names[id(p)] for p in g["params"]])
                              for g in groups])
    finally:
        dist.destroy_process_group()
    assert described[0] == described[1] and len(described[0]) == 8  # 4 layers (depth 2 + 2), with and without decay


ROOT = Path(__file__).resolve().parents[3]


def _start(tmp_path: Path, cfg: dict, *flags: str) -> subprocess.Popen:
    """tools/finetune.py on 2 processes under torchrun (its own free port), `cfg` as a recipe."""
    recipe = tmp_path / f"{Path(cfg['output_dir']).name}.yaml"
    recipe.write_text(yaml.safe_dump({k: v for k, v in cfg.items() if k not in ("trust_pickle", "resume", "eval")}))
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(ROOT / "tools" / "finetune.py"), "--config", str(recipe), *flags],
                            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _torchrun(tmp_path: Path, cfg: dict, *flags: str) -> None:
    proc = _start(tmp_path, cfg, *flags)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]


@pytest.mark.slow  # three 2-process runs under torchrun
def test_two_processes_stopped_by_sigusr1_and_resumed_repeat_an_uninterrupted_run(tmp_path, colour_folder,
                                                                                   torchrun_worker):
    cfg = _cfg(tmp_path, colour_folder, batch_size=2, epochs=3, output_dir=str(tmp_path / "full"))  # 16 iterations
    cut = {**cfg, "output_dir": str(tmp_path / "cut")}
    _torchrun(tmp_path, cfg)
    proc = _start(tmp_path, cut)
    while not (tmp_path / "cut" / "checkpoint-last.pth").is_file() and proc.poll() is None:  # epoch 0 is saved
        time.sleep(0.01)
    time.sleep(0.05)  # into epoch 1
    os.kill(torchrun_worker(proc.pid, 1), signal.SIGUSR1)  # one process only: the other learns it at the next step
    _, err = proc.communicate(timeout=300)
    stopped = re.search(r"preempted \(SIGUSR1\) in epoch (\d) before iteration (\d+)", err)
    assert proc.returncode != 0 and stopped and "--resume auto" in err, err[-3000:]
    position = torch.load(tmp_path / "cut" / "checkpoint-last.pth", weights_only=True)["position"]
    assert (position["epoch"], position["iteration"]) == (int(stopped[1]), int(stopped[2]))
    assert len(position["ranks"]) == 2 and 0 < position["iteration"] < 16
    _torchrun(tmp_path, cut, "--resume", "auto")
    a, b = read_log(tmp_path / "full"), read_log(tmp_path / "cut")
    keys = ("epoch", "train_loss", "test_loss", "test_acc1")
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b] and len(b) == 3
    for name in ("checkpoint-last.pth", "checkpoint-best.pth"):
        assert _same_weights(tmp_path / "full" / name, tmp_path / "cut" / name), name


@pytest.mark.slow  # two 2-process runs under torchrun, then two 1-process resumes
def test_fsdp_fine_tuning_matches_ddp_and_its_folders_resume_and_evaluate_on_one_process(tmp_path, colour_folder):
    """Mixup, RandAugment, drop path, accumulation and gradient clipping, FSDP2 with activation checkpointing."""
    data = tmp_path / "data"  # 25 val images: shares of 13 and 12, i.e. 4 and 3 batches of 4 unless padded
    (data / "val").mkdir(parents=True)
    (data / "train").symlink_to(colour_folder / "train")
    for folder in sorted((colour_folder / "val").iterdir()):
        (data / "val" / folder.name).mkdir()
        for image in sorted(folder.iterdir())[7 if folder.name == "red" else 0:]:
            (data / "val" / folder.name / image.name).symlink_to(image)
    # 64 train images / (4 x 2 processes): 8 iterations, 4 optimizer steps an epoch
    ddp = _cfg(tmp_path, data, batch_size=4, accum_iter=2, epochs=2, clip_grad=1.0, output_dir=str(tmp_path / "ddp"))
    fsdp = {**ddp, "output_dir": str(tmp_path / "fsdp"), "fsdp": True}
    _torchrun(tmp_path, ddp)
    _torchrun(tmp_path, fsdp, "--activation_checkpointing")
    logs = {name: read_log(cfg["output_dir"]) for name, cfg in (("ddp", ddp), ("fsdp", fsdp))}
    losses = {name: [r["train_loss"] for r in log] for name, log in logs.items()}
    assert len(losses["fsdp"]) == 2 and losses["fsdp"][0] != losses["fsdp"][1]
    np.testing.assert_allclose(losses["fsdp"], losses["ddp"], rtol=1e-5)
    np.testing.assert_allclose([r["test_loss"] for r in logs["fsdp"]], [r["test_loss"] for r in logs["ddp"]],
                               rtol=1e-4)
    assert [r["test_images"] for r in logs["fsdp"]] == [25, 25]  # every val image once, padding not counted
    out = tmp_path / "fsdp"
    assert sorted(p.name for p in (out / "checkpoint-last.dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not list(out.glob("*.pth"))
    best = max(r["test_acc1"] for r in logs["fsdp"])
    meta = json.loads((out / "checkpoint-best.dcp" / "meta.json").read_text())
    assert meta["best_acc1"] == meta["acc1"] == best and meta["world_size"] == 2
    evaluated = run({**fsdp, "eval": True, "resume": str(out / "checkpoint-last.dcp")})  # one process reads it whole
    assert evaluated["acc1"] == logs["fsdp"][-1]["test_acc1"] and evaluated["images"] == 25
    run({**fsdp, "epochs": 3, "resume": "auto"})  # a third epoch on one process continues both runs alike
    run({**ddp, "epochs": 3, "resume": "auto"})
    third = [read_log(cfg["output_dir"])[2]["train_loss"] for cfg in (fsdp, ddp)]
    np.testing.assert_allclose(third[0], third[1], rtol=1e-4)
    assert json.loads((out / "checkpoint-last.dcp" / "meta.json").read_text())["epoch"] == 2
