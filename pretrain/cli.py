"""Command lines of the pretraining package; `tools/*.py` and the `crossmae-*` console scripts call these.

Each parses its arguments, calls one library function and returns an exit status (`errors.command` turns a
`UserError` into one `error:` line and status 2).
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from .analysis.report import analyze_attention as analyze
from .analysis.report import reconstruction_grids
from .data.shards import INDEX, write_shards
from .distributed import launch_rank
from .errors import command
from .training.config import load_config
from .training.trainer import run
from .weights.loading import export_encoder as export


@command
def pretrain(argv: Sequence[str] | None = None) -> None:
    """MAE / CrossMAE pretraining: flags as MAE's main_pretrain.py over a recipe (`--config`)."""
    cfg = load_config(argv)
    log_to_stderr("pretrain")
    run(cfg)


@command
def make_shards(argv: Sequence[str] | None = None) -> None:
    """Write an ImageFolder (<class>/<image>) as webdataset tar shards for --data_path, with an index (shards.json)
    of each shard's sample count and the classes."""
    p = argparse.ArgumentParser(description=make_shards.__doc__, epilog=(
        "Each sample is <key>.jpg|png|... (the file's original bytes) and <key>.cls (its class index in sorted-class "
        "order). The samples are shuffled (--seed) before they are cut into shards. Each shard is written under a "
        "temporary name and renamed; the index is written last."))
    p.add_argument("source", help="ImageFolder root holding <class>/<image>, e.g. /data/imagenet/train")
    p.add_argument("output", help=f"folder for the shards PREFIX-NNNNNN.tar and {INDEX}")
    p.add_argument("--shard_size", type=int, default=1000,
                   help="samples per shard (default 1000: ImageNet's train split in 1282 shards of about 110 MB)")
    p.add_argument("--prefix", default="train", help="shard file name prefix (default train)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample order (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace the shards and index of an earlier conversion")
    args = p.parse_args(argv)
    index = write_shards(args.source, args.output, args.shard_size, args.seed, args.overwrite, args.prefix)
    print(f"wrote {index['samples']} samples of {len(index['classes'])} classes in {len(index['shards'])} shards "
          f"to {args.output}; pretrain with --data_path {args.output}")


def log_to_stderr(name: str) -> None:
    """Send logger `name`'s records to stderr with a time stamp: INFO on the main process, warnings on the others."""
    log = logging.getLogger(name)
    if not any(isinstance(h, _Stderr) for h in log.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
    log.setLevel(logging.INFO if launch_rank() == 0 else logging.WARNING)


class _Stderr(logging.StreamHandler):
    """A handler writing to whatever `sys.stderr` is at the time of each record (not the one at creation)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


@command
def export_encoder(argv: Sequence[str] | None = None) -> None:
    """Write the encoder of a pretraining checkpoint as a timm-named `{"model": ..., "meta": ...}` file."""
    p = argparse.ArgumentParser(description=export_encoder.__doc__)
    p.add_argument("checkpoint", help="pretraining checkpoint (this project's, a released MAE / CrossMAE one in any "
                                      "layout the project reads, or a released-weights name)")
    p.add_argument("output", help="where to write the encoder-only file")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUTPUT if it is an existing file (never CHECKPOINT itself, a folder or a device)")
    _trust_pickle_arg(p)
    args = p.parse_args(argv)
    kept, dropped = export(args.checkpoint, args.output, args.trust_pickle, args.overwrite)
    print(f"wrote {kept} encoder tensors to {args.output}; dropped {dropped} decoder keys")


def _trust_pickle_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow weights files that unpickle Python objects (e.g. released checkpoints storing args): "
                        "only for files you trust, since loading them runs their code")


def _checkpoint_args(p: argparse.ArgumentParser, default_output: str, batch_size: int) -> None:
    p.add_argument("checkpoint", help="pretraining checkpoint (ours, a released MAE / CrossMAE one in any layout the "
                                      "project reads, or a released-weights name such as mae_visualize_vit_large)")
    p.add_argument("images", nargs="*", help="image files and/or folders (searched recursively)")
    p.add_argument("--builtin", type=int, help="use N built-in procedural images instead of IMAGES")
    p.add_argument("--model", help="registered model name, for checkpoints without config")
    p.add_argument("--mask_ratio", type=float, help="default: the checkpoint's (0.75 for released ones)")
    p.add_argument("--seed", type=int, default=0, help="mask seed")
    p.add_argument("--batch_size", type=int, default=batch_size)
    p.add_argument("--output", default=default_output, help="output folder")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--num_workers", type=int, default=0, help="data loading processes")
    _trust_pickle_arg(p)


@command
def visualize(argv: Sequence[str] | None = None) -> None:
    """Reconstruction grids (original | masked | reconstruction | reconstruction + visible) of a checkpoint."""
    p = argparse.ArgumentParser(description=visualize.__doc__)
    _checkpoint_args(p, "output/visualize", batch_size=8)
    p.add_argument("--prediction_ratio", type=float,
                   help="CrossMAE: fraction of all patches reconstructed; default mask_ratio (every masked patch)")
    p.add_argument("--norm_pix_loss", action=argparse.BooleanOptionalAction,
                   help="predictions are per-patch normalised pixels (default: config's, else True)")
    a = p.parse_args(argv)
    reconstruction_grids(a.checkpoint, a.images, a.builtin, a.model, a.mask_ratio, a.prediction_ratio,
                         a.norm_pix_loss, a.seed, a.batch_size, a.output, a.device, a.num_workers, a.trust_pickle)


@command
def analyze_attention(argv: Sequence[str] | None = None) -> None:
    """Decoder analysis: MAE's mask-token attention per block (Table 6's per-key statistic and the per-query
    mass), CrossMAE's feature-map weights."""
    p = argparse.ArgumentParser(description=analyze_attention.__doc__)
    _checkpoint_args(p, "output/attention", batch_size=32)
    a = p.parse_args(argv)
    print(analyze(a.checkpoint, a.images, a.builtin, a.model, a.mask_ratio, a.seed, a.batch_size, a.output,
                  a.device, a.num_workers, a.trust_pickle))
    print(f"wrote {a.output}")
