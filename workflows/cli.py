"""Command lines of the workflows package; `tools/*.py` and the `crossmae-*` console scripts call these."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from detection.probe import LEVELS, run_detector_probe
from pretrain.cli import log_to_stderr
from pretrain.errors import ConfigError, command
from pretrain.evaluation.health import health_line
from pretrain.evaluation.features import POOLS
from pretrain.evaluation.objects import ObjectCrops, image_folder
from pretrain.evaluation.probe import chance_text, run_probe
from pretrain.files import check_output_file, write_json_atomic
from pretrain.finetune.config import load_config as load_finetune_config
from pretrain.finetune.trainer import run as run_finetune
from pretrain.models import VIT_SIZES
from pretrain.weights.loading import load_encoder
from pretrain.weights.releases import weights_file

from .benchmark import BenchmarkConfig
from .benchmark import run as run_benchmark
from .demo.pipeline import run as run_demo
from .demo.presets import presets
from .object_folder import builtin_object_folder
from .probe_data import object_sets


@command
def demo(argv: Sequence[str] | None = None) -> None:
    """The whole path on one machine: does a CrossMAE backbone detect as well as an MAE one, for less compute?"""
    p = argparse.ArgumentParser(description=demo.__doc__)
    p.add_argument("--output", help="where everything is written (default demo_output, or demo_output/BUDGET)")
    p.add_argument("--size", choices=presets(), default="tiny",
                   help="a preset of configs/demo/*.yaml: tiny (2-core CPU), small (a CUDA device), smoke "
                        "(seconds, the pipeline in miniature)")
    p.add_argument("--budget", help="a budget of the preset, merged over it: "
                                    "`long` (tiny: about 50 minutes, docs/results/demo.md)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="one full run (pretraining and detection) per seed; the report gives mean ± std "
                        "(default: 0; `--seeds 0 1 2` takes three times as long)")
    p.add_argument("--fresh", action="store_true", help="delete OUTPUT first instead of reusing finished steps")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs side by side, each on its share of the threads (default: 2 where there are at least "
                        "2 threads; 1: one at a time, with each run's own progress bars)")
    p.add_argument("--set", dest="settings", metavar="KEY=VALUE", nargs="+", action="extend", default=[],
                   help="preset settings to change, dotted keys, YAML values: e.g. --set pretrain.blr=8e-3 "
                        "crossmae_prediction_ratio=0.75 (with a new --output: finished steps made with other "
                        "settings are refused)")
    a = p.parse_args(argv)
    print(run_demo(a.output, a.size, a.seeds, a.budget, a.fresh, a.jobs, a.settings))


@command
def finetune(argv: Sequence[str] | None = None) -> None:
    """End-to-end fine-tuning of a pretrained encoder for classification, MAE's recipe and flags
    (`main_finetune.py`); `--data_path builtin` is the objects of the demo's shapes set (4 classes)."""
    cfg = load_finetune_config(argv)
    if cfg["data_path"] == "builtin":
        cfg["data_path"] = str(builtin_object_folder())
    log_to_stderr("finetune")
    result = run_finetune(cfg)
    if cfg["eval"]:
        print(f"* Acc@1 {result['acc1']:.3f} Acc@5 {result['acc5']:.3f} loss {result['loss']:.3f} on "
              f"{result['images']} images (chance: {chance_text(result['chance'], result['classes'])})")


@command
def benchmark(argv: Sequence[str] | None = None) -> None:
    """MAE vs CrossMAE training cost side by side, and the ViTDet backbone's attention kernels."""
    p = argparse.ArgumentParser(description=benchmark.__doc__)
    p.add_argument("--size", choices=tuple(VIT_SIZES), default="base", help="encoder size (tiny for smoke runs)")
    p.add_argument("--input-size", type=int, default=224, help="image side of the main comparison")
    p.add_argument("--patch-size", type=int, default=None, help="patch side (default: the model's, 16 or 14 for huge)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per step (default: 8 on CPU, 128 on CUDA; ViTDet 1 on CPU, 2 on CUDA)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--prediction-ratios", type=float, nargs="+", default=[0.25, 0.75], help="CrossMAE prediction ratios")
    p.add_argument("--mae-decoder-depth", type=int, nargs="+", default=[8],
                   help="MAE decoder depth(s); the first is the baseline")
    p.add_argument("--crossmae-decoder-depth", type=int, nargs="+", default=[12], help="CrossMAE decoder depth(s)")
    p.add_argument("--sweep", type=int, nargs="*", default=[224, 336, 448],
                   help="further input sides for the sequence-length sweep (none: no sweep)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--output", default="output/benchmark", help="directory for the table, JSON and plot")
    p.add_argument("--compile", action="store_true", help="torch.compile the models (off by default)")
    p.add_argument("--fused-adamw", choices=("auto", "on", "off"), default="auto",
                   help="fused AdamW kernel; auto: on for CUDA and CPU (as the trainer), torch's default elsewhere")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="device bf16 dense peak for MFU (default: known for H100/H200/A100)")
    p.add_argument("--vitdet", action="store_true",
                   help="benchmark the ViTDet backbone's attention paths (sdpa, folded) against the explicit softmax")
    p.add_argument("--vitdet-size", type=int, default=1024, help="ViTDet input side (1024 in ViTDet; e.g. 512 on CPU)")
    p.add_argument("--reference", default=None, metavar="DIR",
                   help="a checkout of the official CrossMAE code: time its MAE and CrossMAE steps against ours "
                        "(and ours compiled, with --compile) at --input-size, interleaved; writes reference.md")
    p.add_argument("--cpu-bf16", action="store_true",
                   help="with --reference: also time our step under bf16 autocast on CPU (the trainer's --cpu_bf16)")
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = BenchmarkConfig(**vars(p.parse_args(argv)))
    run_benchmark(cfg, shlex.join([".venv/bin/python", "tools/benchmark.py", *argv]))


def _probe_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=probe.__doc__)
    p.add_argument("checkpoint", help="weights file (pretraining, export, released MAE / CrossMAE, timm, transformers, "
                                      "mmpretrain) or released-weights name (mae_vit_base, crossmae_vit_base, ...)")
    data = p.add_argument_group("data (default: the objects of the built-in shapes set)")
    data.add_argument("--data-path", help="ImageFolder root with train/<class>/<image> and val/<class>/<image>")
    data.add_argument("--config-file", help="a detectron2 LazyConfig: probe the objects of its train / test sets")
    data.add_argument("--train", help="registered COCO-format dataset to train the probes on")
    data.add_argument("--val", help="registered COCO-format dataset to evaluate on")
    data.add_argument("--dataset", nargs=3, action="append", default=[], metavar=("NAME", "JSON", "IMAGE_ROOT"),
                      help="register a COCO-format json + image folder as NAME (repeatable), as train_net")
    f = p.add_argument_group("features")
    f.add_argument("--model", help="registered model name, for checkpoints without config")
    f.add_argument("--trust-pickle", action="store_true",
                   help="allow weights files that unpickle Python objects (e.g. released checkpoints storing args): "
                        "only for files you trust, since loading them runs their code")
    f.add_argument("--view", choices=("crop", "detector"), default="crop",
                   help="crop: each object's box cropped to the encoder's input (default); detector: the whole image "
                        "through the ViTDet backbone that --config-file builds, each box RoIAligned from --block or "
                        "--level, as Mask R-CNN reads it")
    f.add_argument("--block", type=int, default=-1, help="encoder block whose output is used (default: the last)")
    f.add_argument("--pool", choices=POOLS, default="spatial",
                   help="crop view: cls token, mean of the patch tokens, or the whole token grid (default)")
    f.add_argument("--level", choices=LEVELS, help="detector view: a pyramid level instead of --block (its weights "
                   "are freshly initialised unless the checkpoint is a detectron2 one)")
    f.add_argument("--roi-size", type=int, default=4, help="detector view: RoIAlign output side (default 4)")
    f.add_argument("--extract-batch-size", type=int, default=128)
    f.add_argument("--num-workers", type=int, default=0)
    f.add_argument("--device", default="auto")
    f.add_argument("--cache-dir", help="keep features here per checkpoint, data, block and pool (default: none)")
    f.add_argument("--compile", action="store_true",
                   help="crop view: torch.compile the encoder's feature forward (the first batches compile it; off "
                        "by default)")
    q = p.add_argument_group("probes")
    q.add_argument("--k", type=int, default=20, help="k-NN neighbours")
    q.add_argument("--temperature", type=float, default=0.07, help="k-NN vote temperature")
    q.add_argument("--epochs", type=int, default=100, help="linear probe epochs")
    q.add_argument("--batch-size", type=int, default=256, help="linear probe batch size")
    q.add_argument("--blr", type=float, default=0.1, help="linear probe base lr: lr = blr * batch / 256")
    q.add_argument("--weight-decay", type=float, default=0.0)
    q.add_argument("--warmup-epochs", type=int, default=10)
    q.add_argument("--optimizer", choices=("sgd", "lars"), default="sgd", help="sgd (momentum 0.9) or MAE's LARS")
    q.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", help="write the results as JSON here")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the --output file if it exists (never an input, a folder or a device)")
    return p


@command
def probe(argv: Sequence[str] | None = None) -> None:
    """Frozen-feature evaluation of any checkpoint's encoder: k-NN and linear probe, on the objects of a
    COCO-format set (each box cropped, or as the detector reads it: --view detector) or on an ImageFolder with
    train/ and val/."""
    a = _probe_parser().parse_args(argv)
    if a.output:
        inputs = (a.checkpoint, weights_file(a.checkpoint), a.config_file, *(spec[1] for spec in a.dataset))
        check_output_file(a.output, inputs, a.overwrite)
    if a.view == "detector":
        _detector_probe(a)
        return
    encoder, info = load_encoder(a.checkpoint, a.model, a.trust_pickle)
    input_size = encoder.patch_embed.img_size[0]
    if a.data_path:
        root = Path(a.data_path)
        train_set, val_set = image_folder(root / "train", input_size), image_folder(root / "val", input_size)
        key, what = f"folder:{root.resolve()}", f"images of {root}"
    else:
        (train_json, train_root), (val_json, val_root) = object_sets(a.config_file, a.train, a.val, a.dataset)
        train_set = ObjectCrops(train_json, train_root, input_size)
        val_set = ObjectCrops(val_json, val_root, input_size)
        key, what = f"objects:{Path(train_json).resolve()}:{Path(val_json).resolve()}", "objects"
    result = run_probe(a.checkpoint, train_set, val_set, key, model_name=a.model, block=a.block, pool=a.pool,
                       k=a.k, temperature=a.temperature, epochs=a.epochs, batch_size=a.batch_size, blr=a.blr,
                       weight_decay=a.weight_decay, warmup_epochs=a.warmup_epochs, optimizer=a.optimizer,
                       seed=a.seed, extract_batch_size=a.extract_batch_size, num_workers=a.num_workers,
                       device=a.device, cache_dir=a.cache_dir, trust_pickle=a.trust_pickle, compile=a.compile)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, the first process reports
        return
    print(info["report"], file=sys.stderr)
    print(f"feature health of block {result['block']}: {health_line(result['feature_health'][1 + result['block']])}",
          file=sys.stderr)
    _write_json(a.output, result)
    _print_summary(a.checkpoint, result, f"{a.pool} features of block {result['block']}", what)


def _detector_probe(a: argparse.Namespace) -> None:
    """`probe --view detector`: RoI features of the ViTDet backbone that --config-file builds."""
    if not a.config_file:
        raise ConfigError("--view detector needs --config-file, the detectron2 config whose backbone reads the "
                          "images (e.g. configs/demo/mask_rcnn_vit_tiny_builtin.py)")
    if a.compile:
        raise ConfigError("--compile compiles the crop view's encoder; drop it with --view detector")
    if a.data_path:
        raise ConfigError("--view detector reads the boxes of COCO-format sets; --data-path (an ImageFolder) has none")
    train, val = object_sets(a.config_file, a.train, a.val, a.dataset)
    source = a.level or f"block:{a.block}"
    result = run_detector_probe(a.checkpoint, a.config_file, train, val, source=source, roi_size=a.roi_size,
                                trust_pickle=a.trust_pickle, seed=a.seed, k=a.k, temperature=a.temperature,
                                epochs=a.epochs, batch_size=a.batch_size, blr=a.blr, weight_decay=a.weight_decay,
                                warmup_epochs=a.warmup_epochs, optimizer=a.optimizer)
    last = result["feature_health"][-1]
    print(f"feature health of the last block: {health_line(last)}", file=sys.stderr)
    _write_json(a.output, result)
    _print_summary(a.checkpoint, result, f"detector view: {source} RoIAligned {a.roi_size} x {a.roi_size}", "objects")


def _print_summary(checkpoint: str, result: dict, features: str, what: str) -> None:
    """The probe's one line: both accuracies, the chance levels they compare with, then what was probed."""
    print(f"{Path(checkpoint).name}: k-NN {result['knn']['accuracy']:.3f}, linear {result['linear']['accuracy']:.3f} "
          f"(chance: {chance_text(result['chance'], result['classes'])}; {features}; {result['train_samples']} train / "
          f"{result['val_samples']} val {what}, {len(result['classes'])} classes)")


def _write_json(path: str | None, result: dict) -> None:
    if path:
        write_json_atomic(path, result)
