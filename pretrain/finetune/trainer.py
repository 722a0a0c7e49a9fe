"""The fine-tuning run (`tools/finetune.py`): data, classifier, layer-decayed AdamW, epochs, evaluation, checkpoints.

Run machinery is pretraining's (`pretrain.training`): torchrun / DDP or FSDP2 (`--fsdp`, with sharded checkpoint
folders; `--activation_checkpointing`), a refused or resumed output folder, atomic `weights_only` checkpoints, RNG
seeded per epoch so a resumed run repeats an uninterrupted one, a stop on a non-finite loss that keeps the last
checkpoint, and preemption: SIGUSR1 saves the position inside the epoch at the next optimizer step, which
`--resume auto` continues (`pretrain.training.preempt`). Each epoch ends with top-1 / top-5 on `val/`;
`checkpoint-last.pth` is written every epoch and `checkpoint-best.pth` whenever top-1 reaches its best so far (MAE:
`>=`); with `--fsdp` they are the folders `checkpoint-last.dcp/` and `checkpoint-best.dcp/`.
"""
from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from torch.utils.tensorboard import SummaryWriter

from ..distributed import cleanup, init_distributed, is_main_process, resolve_device
from ..errors import CheckpointError, DataError
from ..evaluation.probe import chance_levels, chance_text
from ..files import read_checkpoint, write_text_atomic
from ..sharded import SUFFIX
from ..training.checkpoint import LAST, load_checkpoint
from ..training.engine import NonFiniteLossError
from ..training.layer_decay import param_groups_lrd
from ..training.preempt import (PREEMPT_SIGNALS, EpochPosition, Preempted, ResumableSampler, StopFlag, StopRequested,
                                position_for, preemption, save_position)
from ..training.run_folder import (kept_checkpoint, open_run_folder, preempted_error, save_checkpoint, say_resume,
                                   stopped_error, trim_log)
from ..training.sharding import is_sharded_model, prepare_model, resume_sharded, save_run_state
from ..training.trainer import TrainingDiverged, run_session, seed_epoch
from ..weights.fit import load_model_weights
from ..weights.formats import checkpoint_tensors
from ..weights.releases import resolve_weights
from .config import resolve_lr
from .data import build_criterion, build_mixup, build_splits
from .engine import evaluate, train_one_epoch
from .model import build_classifier, load_pretrained

logger = logging.getLogger("finetune")
BEST = "checkpoint-best.pth"


def run(cfg: dict[str, Any], preempt_signals: Sequence[int] = PREEMPT_SIGNALS) -> dict[str, Any]:
    """Fine-tune as configured, or with `eval` only evaluate `resume`; returns the per-epoch records (or the
    evaluation), the class names and the chance levels of `val/` (`pretrain.evaluation.probe.chance_levels`).

    Raises:
        FolderInUse: another run holds `output_dir` (`pretrain.runlock`; not taken by `eval`, which writes nothing).
        Interrupted: Ctrl-C, or SIGTERM under a command line; the message says what was kept.
        Preempted: one of `preempt_signals` (by default SIGUSR1) reached a process; the run saved its position in
            the epoch at the next optimizer step (under `--fsdp`: kept the last epoch's folder), for `--resume auto`.
        TrainingDiverged: a non-finite loss.
    """
    device = resolve_device(cfg["device"])
    if cfg["eval"]:
        rank, world = init_distributed(device)
        try:
            return evaluate_checkpoint(cfg, device, rank, world)
        finally:
            cleanup()
    out = Path(cfg["output_dir"])
    with run_session(cfg, device, out) as (rank, world), preemption(preempt_signals, device) as stop:
        return _train(cfg, device, rank, world, out, stop)


class _Share(Dataset):
    """Every world-th image of a split from `rank` on, padded with images of label -1 (which `evaluate` does not
    count) to as many on every process: no image twice, so sums over processes are exact, and every process runs
    as many forwards, as FSDP2's collective forward needs."""

    def __init__(self, split: Dataset, rank: int, world: int) -> None:
        self.split, self.indices = split, list(range(rank, len(split), world))
        self.size = math.ceil(len(split) / world)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if i < len(self.indices):
            return self.split[self.indices[i]]
        return self.split[self.indices[0] if self.indices else 0][0], -1


def _val_loader(val_set, cfg: dict[str, Any], rank: int, world: int) -> DataLoader:
    """Each process evaluates every world-th image (`_Share`)."""
    share = _Share(val_set, rank, world) if world > 1 else val_set
    return DataLoader(share, batch_size=cfg["batch_size"], shuffle=False, num_workers=cfg["num_workers"],
                      drop_last=False)


def _num_classes(cfg: dict[str, Any], classes: list[str]) -> int:
    if cfg["nb_classes"] is None:
        return len(classes)
    if cfg["nb_classes"] < len(classes):
        raise DataError(f"--nb_classes {cfg['nb_classes']} is fewer than the {len(classes)} class folders of "
                        f"{cfg['data_path']}; raise it or leave it out")
    return cfg["nb_classes"]


def _head_classes(state_dict: dict[str, torch.Tensor], path: str | Path) -> int:
    if "head.weight" not in state_dict:
        raise CheckpointError(f"{path} has no classifier head (head.weight): it is no fine-tuned checkpoint; "
                              "fine-tune it first (--finetune), then --eval the result")
    return state_dict["head.weight"].shape[0]


def evaluate_checkpoint(cfg: dict[str, Any], device: torch.device, rank: int = 0, world: int = 1) -> dict[str, Any]:
    """Top-1 / top-5 of a fine-tuned checkpoint (ours, MAE's or CrossMAE's released ones, or a release name such as
    crossmae_vit_base_finetune) on `val/`.

    Raises:
        CheckpointError: no classifier head, or a head for another number of classes than `val/` has.
    """
    _, val_set = build_splits(cfg, with_train=False)
    ckpt = read_checkpoint(resolve_weights(cfg["resume"]), trust_pickle=cfg["trust_pickle"])
    state_dict = checkpoint_tensors(ckpt, cfg["resume"])
    num_classes = _head_classes(state_dict, cfg["resume"])
    if num_classes != len(val_set.classes):
        raise CheckpointError(f"{cfg['resume']} classifies {num_classes} classes but {cfg['data_path']}/val has "
                              f"{len(val_set.classes)} class folders; evaluate it on data with its classes")
    config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}  # ours record classes and chance
    trained_on = config.get("classes")
    if trained_on is not None and trained_on != val_set.classes:
        raise CheckpointError(f"{cfg['data_path']}/val has other class folders than {cfg['resume']} was trained on "
                              f"({sorted(set(trained_on) ^ set(val_set.classes))[:5]}); labels would not match")
    model = build_classifier(cfg["model"], num_classes, 0.0, "fc_norm.weight" in state_dict, cfg["input_size"],
                             **cfg["model_kwargs"])
    load_model_weights(model, state_dict, source=cfg["resume"])
    stats = evaluate(model.to(device), _val_loader(val_set, cfg, rank, world), device, num_classes)
    val = torch.tensor(val_set.targets)
    # the majority class is the training set's, recorded in our checkpoints; else val's own
    chance = config.get("chance") or chance_levels(val, val, num_classes)
    return {**stats, "chance": chance, "classes": val_set.classes, "checkpoint": str(cfg["resume"])}


def _build(cfg: dict[str, Any], num_classes: int, resume: Path | None, device: torch.device, world: int):
    """The classifier (pretrained unless resuming) on `device`, with `--activation_checkpointing` and `--fsdp`
    applied, and its layer-decayed AdamW (MAE's betas: torch's default) over the parameters as sharded."""
    seed_epoch(cfg["seed"], -1, 0)  # the same head and drop-path draws on every process
    model = build_classifier(cfg["model"], num_classes, cfg["drop_path"], cfg["global_pool"], cfg["input_size"],
                             **cfg["model_kwargs"])
    if cfg["finetune"] and resume is None:
        for line in load_pretrained(model, cfg["finetune"], cfg["trust_pickle"]).lines():
            logger.info("finetune %s", line.strip())
    model.to(device)
    prepare_model(model, cfg, device, world)  # before the optimizer; names and shapes, hence groups, are kept
    peak_lr = resolve_lr(cfg, world)
    groups = param_groups_lrd(model, cfg["weight_decay"], model.no_weight_decay(), cfg["layer_decay"])
    return model, torch.optim.AdamW(groups, lr=peak_lr), peak_lr


def _resume(path: Path, model, optimizer, cfg: dict[str, Any], rank: int,
            world: int) -> tuple[int, float, EpochPosition | None]:
    """Load a fine-tuning checkpoint, a file or (from `--fsdp`, saved at any number of processes) a folder;
    returns the epoch to start at, the best top-1 so far and, for a checkpoint of a preempted run, this process's
    position inside that epoch."""
    sharded = path.is_dir() or is_sharded_model(model)
    ckpt = resume_sharded(path, model, optimizer, cfg["model"]) if sharded else load_checkpoint(path,
                                                                                              cfg["trust_pickle"])
    if not {"epoch", "best_acc1", *(() if sharded else ("model", "optimizer"))} <= set(ckpt):
        raise CheckpointError(f"{path} is no fine-tuning checkpoint of this tool (needs model, optimizer, epoch, "
                              "best_acc1); start from its weights with --finetune instead")
    if not sharded:
        load_model_weights(model, ckpt["model"], source=str(path))
        optimizer.load_state_dict(ckpt["optimizer"])
    position = position_for(ckpt.get("position"), rank, world, cfg["batch_size"], cfg["accum_iter"], log=logger)
    return int(ckpt["epoch"]) + 1, float(ckpt["best_acc1"]), position


def _train_loader(train_set, cfg: dict[str, Any], device: torch.device, rank: int, world: int) -> DataLoader:
    """Whole batches of a sampler that can start an epoch after the samples a preempted run took.

    Raises:
        DataError: fewer images than one batch.
    """
    if len(train_set) < cfg["batch_size"] * world:
        raise DataError(f"{len(train_set)} training images are fewer than one batch ({cfg['batch_size']} x {world}); "
                        "lower --batch_size or add data")
    sampler = ResumableSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=cfg["seed"])
    return DataLoader(train_set, batch_size=cfg["batch_size"], sampler=sampler, num_workers=cfg["num_workers"],
                      pin_memory=device.type == "cuda", drop_last=True)


def _train(cfg: dict[str, Any], device: torch.device, rank: int, world: int, out: Path,
           stop: StopFlag) -> dict[str, Any]:
    main = rank == 0
    resume = open_run_folder(cfg, out, main, [cfg["finetune"]])
    train_set, val_set = build_splits(cfg)
    num_classes = _num_classes(cfg, train_set.classes)
    model, optimizer, peak_lr = _build(cfg, num_classes, resume, device, world)
    start_epoch, best, position = ((0, 0.0, None) if resume is None
                                   else _resume(resume, model, optimizer, cfg, rank, world))
    if main:
        say_resume(cfg, out, resume, start_epoch, logger)
        trim_log(out, start_epoch)
    mixup = build_mixup(cfg, num_classes)
    criterion = build_criterion(cfg, mixup)
    loader, val_loader = _train_loader(train_set, cfg, device, rank, world), _val_loader(val_set, cfg, rank, world)
    chance = chance_levels(torch.tensor(train_set.targets), torch.tensor(val_set.targets), num_classes)
    resolved = {**cfg, "lr_resolved": peak_lr, "world_size": world, "num_classes": num_classes,
                "classes": train_set.classes, "effective_batch_size": cfg["batch_size"] * cfg["accum_iter"] * world,
                "chance": chance}
    ddp_model = DistributedDataParallel(model) if world > 1 and not cfg["fsdp"] else model
    writer = None
    if main:
        write_text_atomic(out / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
        start = start_epoch + (position.iteration / len(loader) if position is not None else 0)
        # purge_step drops events of an epoch redone after a kill (TensorBoard steps are 1/1000 epochs)
        writer = SummaryWriter(str(out / "tensorboard"), purge_step=int(start * 1000) if start else None)
        logger.info("%s on %s, %d process(es): %d train / %d val images, lr %.3g; chance: %s", cfg["model"], device,
                    world, len(train_set), len(val_set), peak_lr, chance_text(chance, train_set.classes))
    history = []
    for epoch in range(start_epoch, cfg["epochs"]):
        resumed = position if epoch == start_epoch else None
        t0 = time.time()
        try:
            if stop():  # a signal before the first epoch or during the last one's records
                raise preempted_error(stop.name(), f"before epoch {epoch}", out)
            seed_epoch(cfg["seed"], epoch, rank)
            loader.sampler.set_epoch(epoch, resumed.samples_done if resumed is not None else 0)
            stats = _epoch(ddp_model, criterion, loader, optimizer, device, epoch, cfg, peak_lr, mixup, writer, out,
                           resumed, stop)
            test = evaluate(model, val_loader, device, num_classes)
            record = {**{f"train_{k}": v for k, v in stats.items()}, **{f"test_{k}": v for k, v in test.items()},
                      "epoch": epoch}
            best = _record_epoch(record, model, optimizer, resolved, best, out, writer, cfg["fsdp"])
        except StopRequested as e:  # a preemption signal, agreed by every process at an optimizer step
            raise _preempted(e, resumed, stop, model, optimizer, resolved, best, cfg, out, rank, world) from None
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM under a command line: in training or a checkpoint write
            raise stopped_error(e, f"in epoch {epoch}", out, cfg) from None
        history.append(record)
        if main:
            logger.info("epoch %d: loss %.4f, Acc@1 %.2f Acc@5 %.2f (best %.2f, chance %.1f), %.0fs", epoch,
                        stats["loss"], test["acc1"], test["acc5"], best, 100 * chance["uniform"], time.time() - t0)
    if writer is not None:
        writer.close()
    return {"epochs": history, "best_acc1": best, "chance": chance, "classes": train_set.classes,
            "output_dir": str(out)}


def _epoch(model, criterion, loader, optimizer, device, epoch: int, cfg: dict[str, Any], peak_lr: float, mixup,
           writer, out: Path, position: EpochPosition | None, stop: StopFlag) -> dict[str, float]:
    """One epoch (from `position` on, stoppable by `stop`), with a non-finite loss turned into a one-line error that
    names the kept checkpoint."""
    try:
        return train_one_epoch(model, criterion, loader, optimizer, device, epoch, cfg, peak_lr, mixup, writer,
                               position=position, stop=stop)
    except NonFiniteLossError as e:
        raise TrainingDiverged(f"{e}; stopping before saving it: {kept_checkpoint(out)}; lower --blr or check the "
                               "data") from None


def _preempted(e: StopRequested, resumed: EpochPosition | None, stop: StopFlag, model, optimizer,
               resolved: dict[str, Any], best: float, cfg: dict[str, Any], out: Path, rank: int,
               world: int) -> Preempted:
    """Every process: a stop inside an epoch saved as pretraining saves it (`preempt.save_position`), in a
    checkpoint of the last finished epoch's kind (its `best_acc1`; no `acc1` / `acc5`, which these weights were not
    evaluated at); under `--fsdp` nothing is saved and the epoch is redone. Returns the one-line error."""
    epoch = e.position.epoch
    if cfg["fsdp"]:  # sharded checkpoints hold no position inside an epoch
        return preempted_error(stop.name(), f"in epoch {epoch}", out, " (--fsdp saves no position inside an epoch)")
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch - 1,
             "config": dict(resolved), "best_acc1": best}
    return save_position(e, resumed, stop, cfg["batch_size"], state, out, save_checkpoint, rank, world)


def _record_epoch(record: dict[str, Any], model, optimizer, resolved: dict[str, Any], best: float, out: Path,
                  writer: SummaryWriter | None, sharded: bool) -> float:
    """Every process: the best checkpoint if top-1 reached the best so far, the main process's log line and
    TensorBoard, then the last checkpoint (which marks the epoch done); single files written by the main process,
    or with `--fsdp` folders to which every process writes its shards. Returns the new best."""
    epoch, acc1 = record["epoch"], record["test_acc1"]
    best = max(best, acc1)
    scores = {"acc1": acc1, "acc5": record["test_acc5"], "best_acc1": best}
    main = is_main_process()
    ckpt = ({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
             "config": dict(resolved), **scores} if main and not sharded else None)

    def save(name: str) -> None:
        if sharded:
            save_run_state(out / f"{name}{SUFFIX}", model, optimizer, epoch, resolved, (), scores)
        elif ckpt is not None:
            save_checkpoint(ckpt, out / f"{name}.pth")

    if acc1 >= best:
        save(Path(BEST).stem)
    if main:
        with open(out / "log.txt", "a") as f:
            f.write(json.dumps(record) + "\n")
        for key in ("acc1", "acc5", "loss"):
            writer.add_scalar(f"perf/test_{key}", record[f"test_{key}"], epoch)
        writer.flush()
    save(Path(LAST).stem)
    return best
