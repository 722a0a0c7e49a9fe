"""The pretraining run: data, model, optimizer, epochs, checkpoints, logs and figures.

`run(cfg)` is what `tools/main_pretrain.py` calls, one process per device under torchrun.
"""
from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from torch.utils.tensorboard import SummaryWriter

from .checkpoint import LAST, load_checkpoint, load_model_weights, make_checkpoint, resolve_resume, save_atomic
from .config import create_model, resolve_lr
from .data import BuiltinImages, RobustImageFolder, build_dataset, eval_transform
from .distributed import cleanup, init_distributed, resolve_device
from .engine import NonFiniteLossError, train_one_epoch
from .errors import CheckpointError, DataError, UserError
from .optim import build_optimizer
from .visualize import reconstruction_panels, save_reconstruction_grid

logger = logging.getLogger("pretrain")
N_VIS = 4  # images in each reconstruction grid


class TrainingDiverged(UserError):
    """The loss became non-finite; the message names the checkpoint that was kept."""


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Seed every RNG from (seed, epoch, rank): a run resumed at an epoch boundary then draws the
    same crops, flips and masks as an uninterrupted one."""
    s = (seed * 1_000_003 + epoch * 1009 + rank) % 2**31
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)


def _vis_images(cfg: dict[str, Any], dataset, device: torch.device) -> torch.Tensor:
    """A fixed set of centre-cropped images for the reconstruction grids."""
    tf = eval_transform(cfg["input_size"])
    if isinstance(dataset, BuiltinImages):
        source = BuiltinImages(len(dataset), tf, seed=cfg["seed"])
    else:
        source = RobustImageFolder(dataset.folder.root, tf)
    idx = np.linspace(0, len(source) - 1, N_VIS).astype(int)
    return torch.stack([source[int(i)][0] for i in idx]).to(device)


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    """Train as configured; returns {"epochs": [per-epoch stats], "output_dir": ...}."""
    device = resolve_device(cfg["device"])
    rank, world = init_distributed(device)
    out = Path(cfg["output_dir"])
    try:
        return _run(cfg, device, rank, world, out)
    finally:
        cleanup()


def _run(cfg: dict[str, Any], device: torch.device, rank: int, world: int, out: Path) -> dict[str, Any]:
    main = rank == 0
    dataset = build_dataset(cfg["data_path"], cfg["input_size"], cfg["builtin_size"], cfg["seed"])
    per_epoch = len(dataset) // (cfg["batch_size"] * world)
    if per_epoch < 1:
        raise DataError(f"{len(dataset)} images are fewer than one batch ({cfg['batch_size']} x {world} "
                         "processes); lower --batch_size or add data")
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg["seed"])
    loader = DataLoader(dataset, batch_size=cfg["batch_size"], sampler=sampler, num_workers=cfg["num_workers"],
                        pin_memory=device.type == "cuda", drop_last=True)

    seed_epoch(cfg["seed"], -1, 0)  # same initial weights on every process
    model = create_model(cfg).to(device)
    peak_lr = resolve_lr(cfg, world)
    resolved = {**cfg, "lr_resolved": peak_lr, "world_size": world,
                "effective_batch_size": cfg["batch_size"] * cfg["accum_iter"] * world}
    # the fused CUDA kernel computes the same update in one launch per step
    optimizer = build_optimizer(model, peak_lr, cfg["weight_decay"], fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=False)  # bf16 needs no loss scaling; kept for the format

    start_epoch = 0
    resume = resolve_resume(cfg["resume"], out)
    if resume is not None:
        ckpt = load_checkpoint(resume)
        if ckpt.get("config", {}).get("model") not in (None, cfg["model"]):
            raise CheckpointError(f"{resume} was trained as {ckpt['config']['model']}, not --model {cfg['model']}")
        load_model_weights(model, ckpt["model"], source=str(resume))
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch = int(ckpt["epoch"]) + 1
        if main:
            logger.info("resumed from %s at epoch %d", resume, start_epoch)

    ddp_model = DistributedDataParallel(model) if world > 1 else model
    writer = None
    vis = None
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
        writer = SummaryWriter(str(out / "tensorboard"))
        imgs = _vis_images(cfg, dataset, device)
        n_patches = model.patchify(imgs[:1]).shape[1]
        vis = (imgs, torch.rand(N_VIS, n_patches, generator=torch.Generator().manual_seed(cfg["seed"])).to(device))
        logger.info("%s on %s, %d process(es): %d images, %d iterations/epoch, lr %.3g (blr %.3g), effective batch %d",
                    cfg["model"], device, world, len(dataset), per_epoch, peak_lr, cfg["blr"],
                    resolved["effective_batch_size"])

    history = []
    for epoch in range(start_epoch, cfg["epochs"]):
        seed_epoch(cfg["seed"], epoch, rank)
        sampler.set_epoch(epoch)
        t0 = time.time()
        try:
            stats = train_one_epoch(ddp_model, loader, optimizer, scaler, device, epoch, cfg, peak_lr, writer)
        except NonFiniteLossError as e:
            last = out / LAST
            kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet"
            raise TrainingDiverged(f"{e}; stopping, {kept}; lower --blr or check the data") from None
        stats = {"epoch": epoch, **stats}
        history.append(stats)
        if main:
            ckpt = make_checkpoint(model, optimizer, scaler, epoch, resolved)
            save_atomic(ckpt, out / LAST)
            if (epoch + 1) % cfg["save_every"] == 0 or epoch + 1 == cfg["epochs"]:
                save_atomic(ckpt, out / f"checkpoint-{epoch}.pth")
            with open(out / "log.txt", "a") as f:
                f.write(json.dumps({f"train_{k}": v for k, v in stats.items() if k != "epoch"} | {"epoch": epoch}) + "\n")
            writer.add_scalar("epoch/loss", stats["loss"], epoch)
            writer.add_scalar("epoch/images_per_s", stats["images_per_s"], epoch)
            if (epoch + 1) % cfg["vis_every"] == 0 or epoch + 1 == cfg["epochs"]:
                model.eval()
                panels = reconstruction_panels(model, *vis)
                save_reconstruction_grid(panels, out / "recon" / f"epoch_{epoch:04d}.png",
                                         title=f"{cfg['model']} epoch {epoch}")
            logger.info("epoch %d: loss %.4f, lr %.3g, %.1f img/s, %.0fs%s", epoch, stats["loss"], stats["lr"],
                        stats["images_per_s"], time.time() - t0,
                        f", {stats['skipped_images']} unreadable images skipped" if stats["skipped_images"] else "")
    if writer is not None:
        writer.close()
    return {"epochs": history, "output_dir": str(out)}
