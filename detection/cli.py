"""Command lines of the detection package; `tools/*.py` and the `crossmae-*` console scripts call these."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

from detectron2.data.detection_utils import SizeMismatchError
from detectron2.engine import default_argument_parser, launch
from detectron2.utils import comm
from torch.multiprocessing import ProcessExitedException

from pretrain.errors import ConfigError, UserError, command, one_line
from pretrain.files import check_output_file, write_text_atomic
from pretrain.weights.formats import summarize

from .convert import convert_checkpoint
from .lazyconfig import target_from_config
from .preemption import Preempted, forward_stop_signals
from .report import TASKS, ap_table, load_ap, plot_ap, scored
from .train import main

TRAIN_NET_EXAMPLES = """examples:
  # built-in shapes on CPU (the dataset is rendered on first use)
  tools/train_net.py --config-file configs/demo/mask_rcnn_vit_tiny_builtin.py
  # COCO 2017 from $DETECTRON2_DATASETS/coco, 8 GPUs, from a converted pretraining checkpoint
  tools/train_net.py --num-gpus 8 --config-file configs/COCO/mask_rcnn_vitdet_b_100ep.py train.init_checkpoint=vitb_d2.pth
  # the same from MAE's released ViT-B, by name (downloaded once, converted for the config's ViT on the fly)
  tools/train_net.py --num-gpus 8 --config-file configs/COCO/mask_rcnn_vitdet_b_100ep.py train.init_checkpoint=mae_vit_base
  # any COCO-format json + image folder
  tools/train_net.py --config-file ... --dataset mine_train train.json imgs/ --dataset mine_val val.json imgs/ \\
      dataloader.train.dataset.names=mine_train dataloader.test.dataset.names=mine_val model.roi_heads.num_classes=3
  # evaluation only
  tools/train_net.py --config-file ... --eval-only train.init_checkpoint=output/model_final.pth

A --dataset set without masks trains a box-only model; one without annotations is refused (docs/detection.md).
Trailing key=value pairs override config fields. detectron2 evaluates lr_multiplier at the fraction
iter / train.max_iter, so overriding train.max_iter stretches warmup and LR steps along with it.
"""


def train_net_parser() -> argparse.ArgumentParser:
    """detectron2's standard arguments plus `--dataset NAME JSON IMAGE_ROOT`."""
    parser = default_argument_parser(epilog=TRAIN_NET_EXAMPLES)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--dataset", nargs=3, action="append", default=[], metavar=("NAME", "JSON", "IMAGE_ROOT"),
                        help="register a COCO-format json + image folder as NAME (repeatable)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow weights files that unpickle Python objects (.pkl model-zoo files): only for files "
                             "you trust, since loading them runs their code")
    parser.add_argument("--allow-partial-init", action="store_true",
                        help="go on when train.init_checkpoint leaves backbone weights unset (detectron2's default)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier run in train.output_dir instead of refusing (see --resume)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the backbone's forward (the first iterations compile it; off by default)")
    return parser


def train_net(argv: Sequence[str] | None = None) -> int:
    """Train and evaluate a detectron2 LazyConfig in one process per GPU (detectron2's `launch`)."""
    parser = train_net_parser()
    args = parser.parse_args(argv)
    if not args.config_file:
        parser.error("--config-file is required, e.g. configs/demo/mask_rcnn_vit_tiny_builtin.py")
    if not Path(args.config_file).is_file():
        parser.error(f"--config-file {args.config_file} not found; see configs/COCO/ and configs/demo/")
    spawns = args.num_gpus * args.num_machines > 1  # launch runs one worker process per GPU
    try:
        with forward_stop_signals() if spawns else nullcontext():
            launch(_worker, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
                   dist_url=args.dist_url, args=(args, parser.prog))
    except (UserError, SizeMismatchError) as e:
        print(f"{parser.prog}: error: {one_line(e)}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except ProcessExitedException as e:
        if e.exit_code != Preempted.exit_code:
            raise
        return e.exit_code  # a preemption, which rank 0 reported
    except OSError as e:  # unreadable or unwritable paths, a full disk
        print(f"{parser.prog}: error: {e.strerror or e}: {e.filename or ''}; check the path and free space".rstrip(),
              file=sys.stderr)
        return 2
    return 0


def _worker(args: argparse.Namespace, prog: str) -> None:
    """`main` in one process of `launch`. A worker process stopped by a preemption reports it on rank 0 and exits
    with its status (torch's process wrapper would turn the exception into a traceback)."""
    try:
        main(args)
    except Preempted as e:
        if comm.get_world_size() == 1:
            raise
        if comm.is_main_process():
            print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        comm.synchronize()  # rank 0 has printed before any worker exits and launch stops the rest
        sys.exit(e.exit_code)


@command
def convert(argv: Sequence[str] | None = None) -> None:
    """Convert MAE-family weights into a detectron2 ViTDet initialisation checkpoint.

    IN is a weights file in any layout the project reads (official MAE / CrossMAE / timm, Hugging Face transformers
    ViTMAE, mmpretrain MAE, this project's), as .pth or .safetensors, or a released-weights name (mae_vit_base,
    crossmae_vit_base, ...; downloaded once into the cache). OUT holds `{"model": {"backbone.net.<key>": tensor},
    "__author__": ...}`; load it with `train.init_checkpoint=OUT` (which also takes IN directly). Trailing
    key=value pairs override --config as they do for tools/train_net.py; give both commands the same ones (e.g.
    model.backbone.net.pretrain_img_size=448 for a 448 px pretraining).
    """
    parser = argparse.ArgumentParser(description=convert.__doc__.split("\n")[0])
    parser.add_argument("input", help="weights file (.pth, .bin or .safetensors) or released-weights name")
    parser.add_argument("output", help="detectron2 checkpoint to write (.pth)")
    parser.add_argument("--config", help="detectron2 LazyConfig .py whose model.backbone.net is the target ViT")
    parser.add_argument("--embed-dim", type=int, help="target embed dim (without --config)")
    parser.add_argument("--depth", type=int, help="target number of blocks (without --config)")
    parser.add_argument("--patch-size", type=int, help="target patch size (without --config); a smaller patch in IN "
                                                       "is resampled to it (MAE's ViT-H/14 -> 16)")
    parser.add_argument("--pretrain-img-size", type=int, help="target pretrain_img_size (without --config); the "
                                                              "position embedding is resampled to its grid")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="load IN with weights_only=False (only for files you trust, e.g. ones holding args)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("opts", nargs="*", metavar="KEY=VALUE",
                        help="overrides of --config, the same as for tools/train_net.py, e.g. "
                             "model.backbone.net.pretrain_img_size=448")
    args = parser.parse_intermixed_args(argv)

    flags = {"embed_dim": args.embed_dim, "depth": args.depth, "patch_size": args.patch_size,
             "pretrain_img_size": args.pretrain_img_size}
    if args.config and any(v is not None for v in flags.values()):
        parser.error("give either --config or --embed-dim/--depth/--patch-size/--pretrain-img-size, not both")
    if not args.config and None in (args.embed_dim, args.depth, args.patch_size):
        parser.error("give --config, or all of --embed-dim, --depth and --patch-size, to check the encoder")
    if args.opts and not args.config:
        parser.error("key=value overrides apply to --config; give --config, or --pretrain-img-size etc. without it")
    target = target_from_config(args.config, args.opts) if args.config else flags
    report = convert_checkpoint(args.input, args.output, target, args.trust_pickle, args.overwrite)
    ignored = [k for keys in report.dropped.values() for k in keys]
    print(f"{report.source}: {report.layout} layout")
    print(f"used {len(report.loaded)} keys: {summarize(report.loaded)}")
    print(f"ignored {len(ignored)} keys: " + "; ".join(f"{group}: {summarize(keys)}"
                                                        for group, keys in report.dropped.items()))
    for note in report.resized:
        print(f"resized {note}")
    print(f"wrote {len(report.loaded)} tensors to {args.output}")


@command
def compare_backbones(argv: Sequence[str] | None = None) -> None:
    """Compare detection AP of several tools/train_net.py runs side by side (e.g. MAE vs CrossMAE backbones).

    Each DIR is a train_net output dir holding `ap.json`; the first is the baseline, and the table shows every
    other run's delta against it.
    """
    p = argparse.ArgumentParser(description=compare_backbones.__doc__.split("\n")[0])
    p.add_argument("dirs", nargs="+", help="train_net output dirs; the first is the baseline")
    p.add_argument("--names", nargs="+", help="row labels (default: the dir names)")
    p.add_argument("--plot", help="write a bar chart PNG here")
    p.add_argument("--markdown", help="also write the table to this file")
    p.add_argument("--overwrite", action="store_true", help="replace the --plot and --markdown files if they exist")
    args = p.parse_args(argv)
    names = args.names or [Path(d).name for d in args.dirs]
    if len(names) != len(args.dirs):
        p.error(f"{len(names)} --names for {len(args.dirs)} dirs; give one name per dir")
    inputs = [Path(d) / "ap.json" for d in args.dirs]
    for output in filter(None, (args.plot, args.markdown)):
        check_output_file(output, inputs, args.overwrite)
    if args.plot and args.markdown and Path(args.plot).resolve() == Path(args.markdown).resolve():
        raise ConfigError(f"--plot and --markdown name one file, {args.plot}; give two paths")
    results = [scored(load_ap(d)) for d in args.dirs]
    table = ap_table(names, results)
    empty = [f"{name} ({t})" for name, r in zip(names, results) for t in TASKS if r.get(t, {}).get("no_detections")]
    if empty:  # detectron2 reports NaN for these
        table += "\n\nNo detections at all, scored 0 AP: " + ", ".join(empty)
    print(table)
    if args.markdown:
        write_text_atomic(args.markdown, table + "\n")
    if args.plot:
        print(f"plot: {plot_ap(names, results, args.plot)}")
