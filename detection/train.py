"""Training and evaluation of a detectron2 LazyConfig (ViTDet Mask R-CNN): detectron2's `lazyconfig_train_net.py`
plus early config checks, CPU training, and COCO AP written to `OUTPUT_DIR/ap.json` as well as `metrics.json`.

`tools/train_net.py` (`detection.cli.train_net`) parses the arguments and calls `main` in each worker process.
"""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.data import DatasetCatalog
from detectron2.engine import AMPTrainer, SimpleTrainer, default_setup, default_writers, hooks
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.registry import locate
from omegaconf import DictConfig

from pretrain.errors import ConfigError, DataError
from pretrain.runlock import run_lock
from pretrain.weights.releases import is_release_name, resolve_weights

from .checkpointer import SafeCheckpointer
from .datasets import check_dataset, count_annotations, register_builtin_shapes, register_coco_json
from .evaluation import write_ap_json
from .lazyconfig import check_overrides
from .mappers import BitmaskDatasetMapper
from .preemption import PreemptionHook, train_preemptible

logger = logging.getLogger("detectron2")


def _names(names: Any) -> list[str]:
    return [names] if isinstance(names, str) else list(names)


def _mapper_crops_polygons(mapper: DictConfig) -> bool:
    """Whether this train mapper config would crop polygon masks (which needs shapely)."""
    target = mapper.get("_target_")
    target = locate(target) if isinstance(target, str) else target
    if isinstance(target, type) and issubclass(target, BitmaskDatasetMapper):
        return False
    if not mapper.get("use_instance_mask", False) or mapper.get("instance_mask_format", "polygon") != "polygon":
        return False
    crops = ("FixedSizeCrop", "RandomCrop")
    return any(getattr(locate(a._target_) if isinstance(a._target_, str) else a._target_, "__name__", "") in crops
               for a in mapper.get("augmentations", []) if isinstance(a, DictConfig) and "_target_" in a)


def check_config(cfg: DictConfig, eval_only: bool) -> None:
    """Fail early, in one line, on what would otherwise fail deep inside a run.

    Raises:
        ConfigError: Unusable device, checkpoint path or mask format.
        DataError: A dataset is not registered, or its json or image folder is missing.
    """
    device = str(cfg.train.device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={device} but CUDA is unavailable; add train.device=cpu to the command")
    ckpt = str(cfg.train.init_checkpoint or "")
    # what the converter reads: a file, a save_pretrained folder, a released-weights name (fetched only when loaded)
    if ckpt and "://" not in ckpt and not is_release_name(ckpt) and not resolve_weights(ckpt).is_file():
        raise ConfigError(f"train.init_checkpoint={ckpt} does not exist; give a weights file, a save_pretrained "
                          "folder or a released-weights name (e.g. mae_vit_base, crossmae_vit_base), or set "
                          "train.init_checkpoint=''")
    if eval_only and not ckpt:
        raise ConfigError("--eval-only needs weights: set train.init_checkpoint=PATH (e.g. OUTPUT_DIR/model_final.pth)")
    if not eval_only:
        for name in _names(cfg.dataloader.train.dataset.names):
            check_dataset(name)
        if _mapper_crops_polygons(cfg.dataloader.train.mapper) and importlib.util.find_spec("shapely") is None:
            raise ConfigError("cropping polygon masks (LSJ's FixedSizeCrop) needs shapely: pip install shapely, or "
                              "add dataloader.train.mapper._target_=detection.mappers.BitmaskDatasetMapper")
    if "evaluator" in cfg.dataloader:
        for name in _names(cfg.dataloader.test.dataset.names):
            check_dataset(name)


def _without_masks(names: Any, training: bool) -> list[str]:
    """The sets among `names` with objects but no masks (sets `count_annotations` does not read count as masked).

    Raises:
        DataError: a training set has no annotations (crowd regions aside).
    """
    found = []
    for name in _names(names):
        count = count_annotations(name)
        if count is not None and count.objects == 0 and training:
            raise DataError(f"dataset {name!r} has no annotations (crowd regions aside); add annotated objects to "
                            "its json, or use it only as a test set")
        if count is not None and count.objects and not count.masked:
            found.append(name)
    return found


def fit_to_masks(cfg: DictConfig, eval_only: bool) -> list[str]:
    """Turn a Mask R-CNN config into a box-only one when its data has no masks, as detectron2's MODEL.MASK_ON=False.

    A training set (with `eval_only`, a test set) registered by `--dataset` whose objects all lack masks removes
    the mask head (`model.roi_heads.mask_in_features/mask_pooler/mask_head`) and the masks of the train mapper
    (`use_instance_mask`, `recompute_boxes`); the evaluator then scores boxes only, as it does for any test set
    without masks.

    Returns:
        One line to log per change.

    Raises:
        DataError: a training set has no annotations.
    """
    train_sets = [] if eval_only else _without_masks(cfg.dataloader.train.dataset.names, training=True)
    evaluates = "evaluator" in cfg.dataloader
    test_sets = _without_masks(cfg.dataloader.test.dataset.names, training=False) if evaluates or eval_only else []
    heads, notes = cfg.model.get("roi_heads"), []
    deciding = test_sets if eval_only else train_sets
    if deciding and heads is not None and heads.get("mask_in_features") is not None:
        heads.mask_in_features = heads.mask_pooler = heads.mask_head = None
        for key in ("use_instance_mask", "recompute_boxes"):
            if key in cfg.dataloader.train.mapper:
                cfg.dataloader.train.mapper[key] = False
        notes.append(f"dataset {', '.join(deciding)} has boxes but no masks: "
                     f"{'evaluating' if eval_only else 'training'} a box-only model (no mask head; box AP only)")
    if evaluates and (deciding or test_sets) and "tasks" in _parameters(cfg.dataloader.evaluator):
        cfg.dataloader.evaluator.tasks = ["bbox"]
        if test_sets and not deciding:
            notes.append(f"test set {', '.join(test_sets)} has no masks: box AP only")
    return notes


def _parameters(node: Any) -> list[str]:
    """The arguments of a LazyCall node's target ([] for anything else)."""
    target = node.get("_target_") if isinstance(node, DictConfig) else None
    target = locate(target) if isinstance(target, str) else target
    return list(inspect.signature(target).parameters) if callable(target) else []


_RUN_FILES = ("last_checkpoint", "metrics.json", "ap.json", "model_final.pth")


def claim_output_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Make sure a new training run does not silently mix with an earlier one in `out`.

    With `resume`, the earlier run is continued; with `overwrite`, its files (checkpoints, metrics, AP, logs,
    predictions) are deleted first; otherwise a folder holding a run is refused.

    Raises:
        ConfigError: `out` holds an earlier run, or is a file.
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"train.output_dir {out} is a file; give a folder")
    # an empty metrics.json is what a run that failed before its first logged iteration leaves
    found = [f for f in _RUN_FILES if (out / f).is_file() and (out / f).stat().st_size > 0]
    found += sorted(p.name for p in out.glob("model_*.pth"))
    if not found or resume:
        return
    if not overwrite:
        raise ConfigError(f"train.output_dir {out} holds an earlier run ({found[0]}); pass --resume to continue it, "
                          "--overwrite to replace it, or give another train.output_dir")
    for name in [*_RUN_FILES, "log.txt"]:
        (out / name).unlink(missing_ok=True)
    for path in [*out.glob("model_*.pth"), *out.glob("events.out.tfevents.*")]:
        path.unlink()
    shutil.rmtree(out / "inference", ignore_errors=True)


def do_test(cfg: DictConfig, model: torch.nn.Module, iteration: int | None) -> dict:
    """COCO evaluation on `dataloader.test`; also writes `OUTPUT_DIR/ap.json` (main process).

    Returns:
        `{"bbox": {"AP": ..., ...}, "segm": {...}}`, or {} without an evaluator.
    """
    if "evaluator" not in cfg.dataloader:
        return {}
    results = inference_on_dataset(model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator))
    if comm.is_main_process():
        print_csv_format(results)
        path = Path(cfg.train.output_dir) / "ap.json"
        write_ap_json(results, path, iteration)
        logger.info(f"AP written to {path}")
    return results


def compile_backbone(model: torch.nn.Module) -> None:
    """Run the detector's backbone through `torch.compile`, in place (`nn.Module.compile`), so that state-dict keys,
    checkpoints and the DDP wrapper stay those of the eager model."""
    model.backbone.compile()


def do_train(args: argparse.Namespace, cfg: DictConfig) -> None:
    """Train with periodic checkpoints and evaluation, as detectron2's lazyconfig_train_net.py.

    Raises:
        Preempted: a stop signal (`detection.preemption`) ended the run after saving a checkpoint.
    """
    model = instantiate(cfg.model)
    logger.info(f"Model:\n{model}")
    device = torch.device(cfg.train.device)
    model.to(device)
    if args.compile:
        compile_backbone(model)

    cfg.optimizer.params.model = model
    optim = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)

    ddp = dict(cfg.train.ddp)
    if device.type != "cuda":  # DDP's device_ids and fp16 gradient compression are CUDA-only
        ddp.update(device_ids=None, fp16_compression=False)
    model = create_ddp_model(model, **ddp)
    use_amp = bool(cfg.train.amp.enabled) and device.type == "cuda"
    if cfg.train.amp.enabled and not use_amp:
        logger.warning("train.amp.enabled ignored: mixed precision runs on CUDA only")
    trainer = (AMPTrainer if use_amp else SimpleTrainer)(model, train_loader, optim)
    checkpointer = SafeCheckpointer(model, cfg.train.output_dir, trust_pickle=args.trust_pickle,
                                    allow_partial=args.allow_partial_init, optimizer=optim, trainer=trainer)
    trainer.register_hooks([
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if comm.is_main_process() else None,
        # after LRScheduler (its checkpoint holds the stepped schedule), before evaluating and writing: a stopped
        # iteration is logged once, by PeriodicWriter's after_train
        PreemptionHook(checkpointer),
        # EvalHook puts the results into the EventStorage (so metrics.json) and evaluates after the last iteration.
        # Iterations done: trainer.iter + 1 after a step, but trainer.iter == max_iter once training ends.
        hooks.EvalHook(cfg.train.eval_period,
                       lambda: do_test(cfg, model, min(trainer.iter + 1, trainer.max_iter))),
        hooks.PeriodicWriter(default_writers(cfg.train.output_dir, cfg.train.max_iter), period=cfg.train.log_period)
        if comm.is_main_process() else None,
    ])

    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    # a checkpoint stores the iteration that just finished
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    train_preemptible(trainer, start_iter, cfg.train.max_iter)


def load_config(args: argparse.Namespace) -> tuple[DictConfig, list[str]]:
    """Register `--dataset`s and the built-in shapes, load the config with overrides, fit it to data without masks
    (`fit_to_masks`, whose notes `setup` logs) and check it."""
    for name, json_file, image_root in args.dataset:
        register_coco_json(name, json_file, image_root)
    cfg = LazyConfig.load(args.config_file)
    if "builtin_shapes_train" not in DatasetCatalog.list():  # unless the config registered its own variant
        register_builtin_shapes()
    check_overrides(cfg, args.opts)
    cfg = LazyConfig.apply_overrides(cfg, args.opts)
    notes = fit_to_masks(cfg, args.eval_only)
    check_config(cfg, args.eval_only)
    return cfg, notes


def setup(cfg: DictConfig, args: argparse.Namespace, notes: list[str]) -> None:
    """Claim the output folder for a training run (see `claim_output_dir`), then detectron2's set-up: logging,
    seeds, the config saved beside the run; then the notes of `load_config`."""
    if not args.eval_only:
        claim_output_dir(Path(cfg.train.output_dir), args.resume, args.overwrite)
    default_setup(cfg, args)
    _follow_stdout()
    for note in notes:
        logger.warning(note)


class _CurrentStdout:
    """Writes to whatever `sys.stdout` is at each write."""

    def write(self, text: str) -> int:
        return sys.stdout.write(text)

    def flush(self) -> None:
        sys.stdout.flush()


def _follow_stdout() -> None:
    """Point detectron2's console log handlers at the current `sys.stdout` at each write: `setup_logger` binds the
    stream once per process, and a process that runs train_net again (tests, notebooks) may have replaced it."""
    for name in ("detectron2", "d2", "fvcore"):
        for handler in logging.getLogger(name).handlers:
            if type(handler) is logging.StreamHandler:
                handler.stream = _CurrentStdout()


def main(args: argparse.Namespace) -> dict | None:
    """Entry point of every worker process; returns the evaluation results with `--eval-only`.

    The main process holds the output folder's lock (`pretrain.runlock`) for the whole run, evaluation included
    (it writes ap.json, config.yaml and logs there): a second run into the folder is refused.
    """
    cfg, notes = load_config(args)
    with run_lock(Path(cfg.train.output_dir), "train.output_dir", enabled=comm.is_main_process()):
        return _run(cfg, args, notes)


def _run(cfg: DictConfig, args: argparse.Namespace, notes: list[str]) -> dict | None:
    """Set up, then train (and evaluate), or evaluate only."""
    setup(cfg, args, notes)
    if not args.eval_only:
        do_train(args, cfg)
        return None
    model = instantiate(cfg.model)
    model.to(cfg.train.device)
    if args.compile:
        compile_backbone(model)
    model = create_ddp_model(model)
    extra = SafeCheckpointer(model, trust_pickle=args.trust_pickle, allow_partial=args.allow_partial_init,
                             strict=True).load(cfg.train.init_checkpoint)
    return do_test(cfg, model, extra.get("iteration"))
