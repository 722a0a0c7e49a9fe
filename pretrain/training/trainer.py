"""The pretraining run: data, model, optimizer, epochs, checkpoints, logs and figures.

`run(cfg)` is what `tools/main_pretrain.py` calls, one process per device under torchrun.
"""
from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter

from ..analysis.figures import reconstruction_panels, save_reconstruction_grid
from ..data.images import BuiltinImages, RobustImages, build_dataset, eval_transform
from ..data.shards import ShardedImages, ShardLoader, is_sharded, open_shards
from ..distributed import cleanup, init_distributed, launch_rank, resolve_device
from ..errors import CheckpointError, ConfigError, DataError, UserError
from ..models import create_model
from ..runlock import run_lock
from ..weights.fit import load_model_weights
from ..weights.loading import load_encoder_into
from .checkpoint import LAST, load_checkpoint, make_checkpoint
from .config import resolve_lr
from .engine import NonFiniteLossError, SpikeGuard, optimizer_steps_per_epoch, train_one_epoch
from .optim import build_optimizer, fused_by_default
from .run_folder import (kept_checkpoint, open_run_folder, preempted_error, save_checkpoint, say_resume, stopped_error,
                         trim_log)
from .preempt import (PREEMPT_SIGNALS, EpochPosition, Preempted, ResumableSampler, StopFlag, StopRequested,
                      position_for, preemption, save_position)
from .sharding import gathered, is_sharded_model, prepare_model, record_sharded, resume_sharded

logger = logging.getLogger("pretrain")
N_VIS = 4  # images in each reconstruction grid


class TrainingDiverged(UserError):
    """The loss became non-finite or spiked; the message names the checkpoint that was kept."""


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Seed every RNG from (seed, epoch, rank): a run resumed at an epoch boundary then draws the
    same crops, flips and masks as an uninterrupted one."""
    s = (seed * 1_000_003 + epoch * 1009 + rank) % 2**31
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)


def save_snapshot(model: torch.nn.Module, out: Path, step: int, epoch: int, config: dict[str, Any]) -> Path:
    """Weights only, for evaluating a run along the way: `OUT/snapshots/step-<step>.pth` = {model, step, epoch,
    config}, atomically; unlike the resume checkpoints it holds no optimizer state."""
    path = out / "snapshots" / f"step-{step:07d}.pth"
    save_checkpoint({"model": model.state_dict(), "step": step, "epoch": epoch, "config": dict(config)}, path)
    return path


def _vis_images(cfg: dict[str, Any], dataset, device: torch.device) -> torch.Tensor:
    """A fixed set of centre-cropped images for the reconstruction grids."""
    tf = eval_transform(cfg["input_size"])
    if isinstance(dataset, BuiltinImages):
        source = BuiltinImages(len(dataset), tf, seed=cfg["seed"])
    elif isinstance(dataset, ShardedImages):
        source = dataset.head(N_VIS, tf)
    else:
        source = RobustImages(dataset.files, tf, dataset.root)
    idx = np.linspace(0, len(source) - 1, N_VIS).astype(int)
    return torch.stack([source[int(i)][0] for i in idx]).to(device)


def run(cfg: dict[str, Any], preempt_signals: Sequence[int] = PREEMPT_SIGNALS) -> dict[str, Any]:
    """Train as configured; returns {"epochs": [per-epoch stats], "output_dir": ...}.

    Raises:
        FolderInUse: another run holds `output_dir` (`pretrain.runlock`).
        Interrupted: Ctrl-C, or SIGTERM under a command line; the message says what was kept.
        Preempted: one of `preempt_signals` (by default SIGUSR1) reached a process; the run saved its position in
            the epoch at the next optimizer step (`pretrain.training.preempt`), for `--resume auto`.
        TrainingDiverged: a non-finite or spiking loss, or non-finite weights.
    """
    device = resolve_device(cfg["device"])
    out = Path(cfg["output_dir"])
    with run_session(cfg, device, out) as (rank, world), preemption(preempt_signals, device) as stop:
        return _run(cfg, device, rank, world, out, stop)


@contextmanager
def run_session(cfg: dict[str, Any], device: torch.device, out: Path) -> Iterator[tuple[int, int]]:
    """A training run's process set-up, for pretraining and fine-tuning: the output folder's lock, the process group
    (yields rank and world size), a Ctrl-C or SIGTERM before the first epoch as a one-line `Interrupted`, and a
    preemption said once, by the main process."""
    # torchrun's first process holds the folder, from before the process group forms: a refusal then ends that
    # process alone, and torchrun stops the others, instead of leaving them waiting for it
    with run_lock(out, "--output_dir", enabled=launch_rank() == 0):
        rank, world = init_distributed(device)
        try:
            yield rank, world
        except KeyboardInterrupt as e:  # in the set-up, before the first epoch (the epochs catch their own)
            raise stopped_error(e, "before training", out, cfg) from None
        except Preempted as e:
            e.quiet = rank != 0  # every process stops with its status; the main one prints the line
            raise
        finally:
            cleanup()


def _check_resumable(ckpt: dict, path: Path, cfg: dict[str, Any]) -> None:
    missing = [k for k in ("model", "optimizer", "epoch") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} has no {', '.join(missing)}: it is no resume checkpoint of this trainer (a "
                              "released or exported file?); start a new run from its encoder with --init_from")
    model = (ckpt.get("config") or {}).get("model")
    if model not in (None, cfg["model"]):
        raise CheckpointError(f"{path} was trained as {model}, not --model {cfg['model']}")


def _finite(model: torch.nn.Module) -> bool:
    return all(torch.isfinite(p).all() for p in model.parameters())


def _loader(cfg: dict[str, Any], dataset, device: torch.device, rank: int, world: int) -> tuple[DataLoader, int]:
    """The training loader (a distributed sampler, whole batches; or a `ShardLoader`) and its optimizer steps per
    epoch.

    Raises:
        DataError: fewer images than one batch.
        ConfigError: an accumulation longer than an epoch, whose optimizer would never step.
    """
    sharded = isinstance(dataset, ShardedImages)
    if sharded:  # equal iterations on every process; the data-loader workers split the shards (pretrain.data.shards)
        loader = ShardLoader(dataset, cfg["batch_size"], world, cfg["num_workers"], device.type == "cuda")
    per_epoch = len(loader) if sharded else len(dataset) // (cfg["batch_size"] * world)
    if per_epoch < 1:
        raise DataError(f"{len(dataset)} images are fewer than one batch ({cfg['batch_size']} x {world} "
                         "processes); lower --batch_size or add data")
    steps_per_epoch = optimizer_steps_per_epoch(per_epoch, cfg["accum_iter"], cfg["step_partial_accum"])
    if steps_per_epoch < 1:
        raise ConfigError(f"--accum_iter {cfg['accum_iter']} exceeds the {per_epoch} iterations of an epoch, whose "
                          "partial group is dropped as in the official trainers: the optimizer would never step; "
                          "lower --accum_iter or pass --step_partial_accum")
    if sharded:
        return loader, steps_per_epoch
    sampler = ResumableSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg["seed"])
    loader = DataLoader(dataset, batch_size=cfg["batch_size"], sampler=sampler, num_workers=cfg["num_workers"],
                        pin_memory=device.type == "cuda", drop_last=True)
    return loader, steps_per_epoch


def _resume(resume: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
            cfg: dict[str, Any], rank: int, world: int) -> tuple[int, SpikeGuard, EpochPosition | None]:
    """Load a resume checkpoint into the model, optimizer and scaler; returns the epoch to start at, the
    divergence guard with the run's recent losses (none from a checkpoint older than them) and, for a checkpoint
    of a preempted run, this process's position inside that epoch."""
    if resume.is_dir() or is_sharded_model(model):  # a checkpoint folder, of any number of processes
        ckpt = resume_sharded(resume, model, optimizer, cfg["model"])
    else:
        ckpt = load_checkpoint(resume, cfg["trust_pickle"])
        _check_resumable(ckpt, resume, cfg)
        load_model_weights(model, ckpt["model"], source=str(resume))
        optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt.get("scaler", {}))
    window = ckpt.get("loss_window")
    window = [x for x in window if isinstance(x, float)] if isinstance(window, list) else []
    position = position_for(ckpt.get("position"), rank, world, cfg["batch_size"], cfg["accum_iter"])
    window = position.loss_window if position is not None else window
    return int(ckpt["epoch"]) + 1, SpikeGuard(cfg["loss_spike_factor"], window), position


def _start_records(cfg: dict[str, Any], resolved: dict[str, Any], out: Path, start_epoch: float, model, dataset,
                   device: torch.device) -> tuple[SummaryWriter, tuple[torch.Tensor, torch.Tensor]]:
    """The main process's records of a run that starts `start_epoch` epochs in (fractional inside an epoch):
    config.yaml, the TensorBoard writer, the fixed images and masks of the reconstruction grids, the step-0 snapshot
    of a new run."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    # purge_step drops events of an epoch redone after a kill (TensorBoard steps are 1/1000 epochs)
    writer = SummaryWriter(str(out / "tensorboard"), purge_step=int(start_epoch * 1000) if start_epoch else None)
    imgs = _vis_images(cfg, dataset, device)
    n_patches = model.patchify(imgs[:1]).shape[1]
    vis = (imgs, torch.rand(N_VIS, n_patches, generator=torch.Generator().manual_seed(cfg["seed"])).to(device))
    if cfg["snapshot_every"] and start_epoch == 0:
        save_snapshot(model, out, 0, -1, resolved)  # the step-0 weights, the control of every comparison
    return writer, vis


def _record_epoch(stats: dict[str, Any], cfg: dict[str, Any], resolved: dict[str, Any], out: Path, model, optimizer,
                  scaler, spike: SpikeGuard, steps_per_epoch: int, writer: SummaryWriter,
                  vis: tuple[torch.Tensor, torch.Tensor], checkpoints: bool = True) -> None:
    """The main process's record of a finished epoch: numbered checkpoint, snapshot, reconstruction grid, log line,
    TensorBoard scalars, and last `checkpoint-last.pth`, which marks the epoch done (no checkpoints with `--fsdp`,
    whose folders `sharding.record_sharded` writes around this record)."""
    epoch = stats["epoch"]
    ckpt = make_checkpoint(model, optimizer, scaler, epoch, resolved, spike.recent) if checkpoints else None
    if checkpoints and ((epoch + 1) % cfg["save_every"] == 0 or epoch + 1 == cfg["epochs"]):
        save_checkpoint(ckpt, out / f"checkpoint-{epoch}.pth")
    if cfg["snapshot_every"] and ((epoch + 1) % cfg["snapshot_every"] == 0 or epoch + 1 == cfg["epochs"]):
        save_snapshot(model, out, (epoch + 1) * steps_per_epoch, epoch, resolved)
    if (epoch + 1) % cfg["vis_every"] == 0 or epoch + 1 == cfg["epochs"]:
        model.eval()
        panels = reconstruction_panels(model, *vis)
        save_reconstruction_grid(panels, out / "recon" / f"epoch_{epoch:04d}.png", title=f"{cfg['model']} epoch {epoch}")
    with open(out / "log.txt", "a") as f:
        f.write(json.dumps({f"train_{k}": v for k, v in stats.items() if k != "epoch"} | {"epoch": epoch}) + "\n")
    writer.add_scalar("epoch/loss", stats["loss"], (epoch + 1) * 1000)
    writer.add_scalar("epoch/images_per_s", stats["images_per_s"], (epoch + 1) * 1000)
    writer.flush()
    if checkpoints:
        save_checkpoint(ckpt, out / LAST)


def _train_epoch(model, ddp_model, loader, optimizer, scaler, device: torch.device, epoch: int, cfg: dict[str, Any],
                 peak_lr: float, writer: SummaryWriter | None, spike: SpikeGuard, out: Path,
                 position: EpochPosition | None = None, stop: StopFlag | None = None) -> dict[str, Any]:
    """One epoch (from `position` on, stoppable by `stop`), with divergence turned into one-line errors that name
    the kept checkpoint."""
    try:
        stats = train_one_epoch(ddp_model, loader, optimizer, scaler, device, epoch, cfg, peak_lr, writer, spike,
                                position=position, stop=stop)
    except NonFiniteLossError as e:
        raise TrainingDiverged(f"{e}; stopping before saving it: {kept_checkpoint(out)}; lower --blr or check the "
                               "data") from None
    if not _finite(model):
        raise TrainingDiverged(f"weights became non-finite in epoch {epoch}; stopping before saving them: "
                               f"{kept_checkpoint(out)}")
    return {"epoch": epoch, **stats}


def _build(cfg: dict[str, Any], device: torch.device, world: int) -> tuple[torch.nn.Module, torch.optim.Optimizer,
                                                                          torch.amp.GradScaler, float, dict[str, Any]]:
    """The model (same initial weights on every process, or `init_from`'s encoder), its optimizer and scaler, the
    peak lr, and the resolved configuration that checkpoints store."""
    seed_epoch(cfg["seed"], -1, 0)
    model = create_model(cfg)
    if cfg["init_from"]:
        for line in load_encoder_into(model, cfg["init_from"], cfg["trust_pickle"]).lines():
            logger.info("init_from %s", line.strip())
    model.to(device)
    prepare_model(model, cfg, device, world)  # activation checkpointing, FSDP2: before the optimizer
    peak_lr = resolve_lr(cfg, world)
    resolved = {**cfg, "lr_resolved": peak_lr, "world_size": world,
                "effective_batch_size": cfg["batch_size"] * cfg["accum_iter"] * world}
    optimizer = build_optimizer(model, peak_lr, cfg["weight_decay"], fused=fused_by_default(device))
    scaler = torch.amp.GradScaler(device.type, enabled=False)  # bf16 needs no loss scaling; kept for the format
    return model, optimizer, scaler, peak_lr, resolved


def _complete(cfg: dict[str, Any], resume: Path, start_epoch: int, out: Path) -> dict[str, Any]:
    logger.warning("the run is already complete: %s is from epoch %d of --epochs %d; raise --epochs to train further",
                   resume, start_epoch - 1, cfg["epochs"])
    return {"epochs": [], "output_dir": str(out), "complete": True}


def _usable_position(position: EpochPosition | None, loader) -> EpochPosition | None:
    """`position`, unless it was saved at another world size or batch size and the data are shards, whose stream is
    split by process and worker: its batches already taken cannot be told apart, so the epoch starts again."""
    if position is not None and position.rng is None and isinstance(loader, ShardLoader):
        logger.warning("shards: the run stopped at another number of processes or batch size, which split the stream "
                       "otherwise; epoch %d starts again from its beginning", position.epoch)
        return None
    return position


def _training_forward(model: torch.nn.Module, cfg: dict[str, Any], world: int) -> torch.nn.Module:
    """What the epochs call: DDP's wrapper with several processes (FSDP2 shards `model` itself), compiled with
    `compile`; checkpoints, snapshots and figures use `model`."""
    forward = DistributedDataParallel(model) if world > 1 and not cfg["fsdp"] else model
    return torch.compile(forward) if cfg["compile"] else forward


def _open_data(cfg: dict[str, Any]):
    """The training images: webdataset shards when `data_path` names them, else an image folder or the built-in set."""
    if is_sharded(cfg["data_path"]):
        return open_shards(cfg["data_path"], cfg["input_size"], cfg["seed"], cfg["shuffle_buffer"])
    return build_dataset(cfg["data_path"], cfg["input_size"], cfg["builtin_size"], cfg["seed"],
                         cache_images=cfg["cache_images"])


def _say_epoch(stats: dict[str, Any], seconds: float) -> None:
    logger.info("epoch %d: loss %.4f, lr %.3g, %.1f img/s, %.0fs%s", stats["epoch"], stats["loss"], stats["lr"],
                stats["images_per_s"], seconds,
                f", {stats['skipped_images']} unreadable images skipped" if stats["skipped_images"] else "")


def _run(cfg: dict[str, Any], device: torch.device, rank: int, world: int, out: Path,
         stop: StopFlag) -> dict[str, Any]:
    """The run in one process: set-up, resume, then epoch after epoch; one linear sequence, read whole."""
    main = rank == 0
    resume = open_run_folder(cfg, out, main, [cfg["init_from"]])
    dataset = _open_data(cfg)
    loader, steps_per_epoch = _loader(cfg, dataset, device, rank, world)
    model, optimizer, scaler, peak_lr, resolved = _build(cfg, device, world)
    start_epoch, spike, position = ((0, SpikeGuard(cfg["loss_spike_factor"]), None) if resume is None
                                    else _resume(resume, model, optimizer, scaler, cfg, rank, world))
    position = _usable_position(position, loader)
    if start_epoch >= cfg["epochs"]:
        return _complete(cfg, resume, start_epoch, out)
    ddp_model = _training_forward(model, cfg, world)
    writer, vis = None, None
    first = gathered(model, cfg, device, bool(cfg["snapshot_every"]) and start_epoch == 0)  # whole, for a snapshot
    if main:
        say_resume(cfg, out, resume, start_epoch)
        trim_log(out, start_epoch)
        start = start_epoch + (position.iteration / len(loader) if position is not None else 0)
        writer, vis = _start_records(cfg, resolved, out, start, first, dataset, device)
        logger.info("%s on %s, %d process(es): %d images, %d iterations/epoch, lr %.3g (blr %.3g), effective batch %d",
                    cfg["model"], device, world, len(dataset), len(loader), peak_lr,
                    cfg["blr"], resolved["effective_batch_size"])
    history = []
    for epoch in range(start_epoch, cfg["epochs"]):
        resumed = position if epoch == start_epoch else None
        try:
            if stop():  # a signal before the first epoch or during the last one's records
                raise preempted_error(stop.name(), f"before epoch {epoch}", out)
            seed_epoch(cfg["seed"], epoch, rank)
            done = resumed.samples_done if resumed is not None else 0
            (loader if isinstance(loader, ShardLoader) else loader.sampler).set_epoch(epoch, done)
            t0 = time.time()
            stats = _train_epoch(model, ddp_model, loader, optimizer, scaler, device, epoch, cfg, peak_lr, writer,
                                 spike, out, resumed, stop)
            if cfg["fsdp"]:  # every process writes its shards of the checkpoints, around the main one's record
                record_sharded(epoch, cfg, resolved, out, model, optimizer, spike.recent, device,
                               lambda whole: _record_epoch(stats, cfg, resolved, out, whole, optimizer, scaler, spike,
                                                           steps_per_epoch, writer, vis, checkpoints=False))
            elif main:  # the epoch's whole record first, checkpoint-last.pth (which marks it done) last
                _record_epoch(stats, cfg, resolved, out, model, optimizer, scaler, spike, steps_per_epoch, writer, vis)
            if main:
                _say_epoch(stats, time.time() - t0)
        except StopRequested as e:  # a preemption signal, agreed by every process at an optimizer step
            if cfg["fsdp"]:  # sharded checkpoints hold no position inside an epoch: the epoch is redone
                raise preempted_error(stop.name(), f"in epoch {epoch}", out,
                                      " (--fsdp saves no position inside an epoch)") from None
            state = make_checkpoint(model, optimizer, scaler, epoch - 1, resolved, spike.recent)
            raise save_position(e, resumed, stop, cfg["batch_size"], state, out, save_checkpoint, rank, world) from None
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM under a command line: in training or a checkpoint write
            raise stopped_error(e, f"in epoch {epoch}", out, cfg) from None
        history.append(stats)
    if writer is not None:
        writer.close()
    return {"epochs": history, "output_dir": str(out)}
