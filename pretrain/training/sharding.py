"""FSDP2 and activation checkpointing for pretraining and fine-tuning (`--fsdp`, `--activation_checkpointing`), and
the sharded resume checkpoints (`OUTPUT_DIR/checkpoint-last.dcp/`) of an `--fsdp` run.

- `prepare_model`: activation checkpointing per transformer block (torch's `checkpoint_wrapper`, non-reentrant), then
  `fully_shard` per block (encoder and decoder) and on the root, bf16 parameters and fp32 gradient reduction on CUDA,
  fp32 on CPU (the precision of `engine.autocast`). With one process nothing is sharded: the model stays whole and
  its checkpoints are still folders, so a sharded run continues there and back at any number of processes.
- `save_run_state` / `resume_sharded`: model and optimizer through `torch.distributed.checkpoint.state_dict`
  (`get_state_dict` / `set_state_dict`: parameter names as in `model.state_dict()`, whatever the sharding), written
  by `pretrain.sharded` (atomic folders, safe reading).
- `record_sharded`: an `--fsdp` epoch's record, in which every process takes part.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (CheckpointImpl, apply_activation_checkpointing,
                                                                         checkpoint_wrapper)
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from ..distributed import is_main_process
from ..errors import CheckpointError, ConfigError
from ..models import create_model
from ..sharded import SUFFIX, load_sharded, read_meta, save_sharded
from .checkpoint import LAST_SHARDED


def blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of an MAE / CrossMAE model (the encoder's, then the decoder's) or of timm's ViT
    classifier."""
    return [*model.blocks, *getattr(model, "decoder_blocks", [])]


def checkpoint_activations(model: nn.Module) -> None:
    """Recompute each block's activations in the backward pass instead of keeping them (non-reentrant checkpointing
    through torch's `checkpoint_wrapper`; `state_dict` keys are unchanged)."""
    wanted = {id(b) for b in blocks(model)}
    apply_activation_checkpointing(model, checkpoint_wrapper_fn=partial(checkpoint_wrapper,
                                                                         checkpoint_impl=CheckpointImpl.NO_REENTRANT),
                                   check_fn=lambda m: id(m) in wanted)


def shard(model: nn.Module, device: torch.device) -> None:
    """`fully_shard` each block, then the root, over the default process group."""
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if device.type == "cuda" else MixedPrecisionPolicy())
    for block in blocks(model):
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def prepare_model(model: nn.Module, cfg: dict[str, Any], device: torch.device, world: int) -> None:
    """Apply `--activation_checkpointing` and, with `--fsdp` on several processes, FSDP2, in place (before the
    optimizer is built over the sharded parameters)."""
    if cfg["activation_checkpointing"]:
        checkpoint_activations(model)
    if cfg["fsdp"] and world > 1:
        shard(model, device)


def is_sharded_model(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def save_run_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int,
                   config: dict[str, Any], loss_window: Sequence[float], extra: dict[str, Any] | None = None) -> None:
    """Every process: the model and optimizer (each process its shards) and the metadata of a single-file checkpoint
    (`checkpoint.make_checkpoint`: epoch, config, loss window; and `extra`, e.g. fine-tuning's accuracies) into the
    folder `path`, atomically."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    meta = {**(extra or {}), "epoch": epoch, "config": dict(config), "loss_window": [float(x) for x in loss_window],
            "world_size": dist.get_world_size() if dist.is_initialized() else 1}
    save_sharded({"model": model_sd, "optimizer": optim_sd}, meta, path)


def resume_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, model_name: str) -> dict[str, Any]:
    """Every process: load a checkpoint folder saved at any number of processes into `model` and `optimizer` (sharded
    or whole); returns its metadata (`epoch`, `config`, `loss_window`).

    Raises:
        CheckpointError: `path` is no checkpoint folder of this trainer, or one of another model.
        ConfigError: a single-file checkpoint given to a sharded model.
    """
    if path.suffix != SUFFIX:
        raise ConfigError(f"--fsdp resumes {SUFFIX} folders; {path} is a single-file checkpoint: resume it without "
                          "--fsdp (its next checkpoints are single files too)")
    meta = read_meta(path)
    if not isinstance(meta.get("epoch"), int):
        raise CheckpointError(f"{path} has no meta.json with an epoch: it is no checkpoint folder of this trainer")
    trained = (meta.get("config") or {}).get("model")
    if trained not in (None, model_name):
        raise CheckpointError(f"{path} was trained as {trained}, not --model {model_name}")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    load_sharded(state, path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return meta


def gathered(model: nn.Module, cfg: dict[str, Any], device: torch.device, due: bool = True) -> nn.Module | None:
    """Every process: for the main one's figures and snapshots, a whole copy of a sharded model on `device` (None on
    the others); `model` itself when it is not sharded or nothing is `due`."""
    if not due or not is_sharded_model(model):
        return model
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    copy = create_model(cfg)
    copy.load_state_dict(full)
    return copy.to(device)


def _due(every: int, epoch: int, epochs: int) -> bool:
    return bool(every) and ((epoch + 1) % every == 0 or epoch + 1 == epochs)


def record_sharded(epoch: int, cfg: dict[str, Any], resolved: dict[str, Any], out: Path, model: nn.Module,
                   optimizer: torch.optim.Optimizer, loss_window: Sequence[float], device: torch.device,
                   record: Callable[[nn.Module], None]) -> None:
    """Every process: an `--fsdp` epoch's numbered checkpoint folder (every `--save_every` epochs), then the main
    process's `record(whole_model)` (the trainer's snapshot, figure, log line), then `checkpoint-last.dcp`, which
    marks the epoch done."""
    if _due(cfg["save_every"], epoch, cfg["epochs"]):
        save_run_state(out / f"checkpoint-{epoch}{SUFFIX}", model, optimizer, epoch, resolved, loss_window)
    # the trainer's schedule of snapshots and figures (`trainer._record_epoch`): only then is a copy gathered
    due = _due(cfg["snapshot_every"], epoch, cfg["epochs"]) or _due(cfg["vis_every"], epoch, cfg["epochs"])
    whole = gathered(model, cfg, device, due)
    if is_main_process():
        record(whole)
    save_run_state(out / LAST_SHARDED, model, optimizer, epoch, resolved, loss_window)
