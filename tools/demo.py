"""The whole path on one machine: does a CrossMAE backbone detect as well as an MAE one, for less compute?

  make demo                                     # CPU defaults, about 15 minutes on 2 cores
  .venv/bin/python tools/demo.py --seeds 0 1 2  # three full runs: mean ± std, the run-to-run spread
  .venv/bin/python tools/demo.py --size small   # on a CUDA device: bigger backbones, longer schedules

Steps per seed, into OUTPUT/seed<S>/, each skipped when its output already exists (rerun after an
interruption to continue, or with more seeds to add runs; --fresh starts over):
  1. pretrain MAE and CrossMAE ViTs on the built-in images, same epochs and data (CrossMAE in the
     paper's efficient setting, prediction ratio 0.25);
  2. convert each encoder into a detectron2 ViTDet checkpoint;
  3. fine-tune Mask R-CNN on the built-in COCO-format shapes dataset from each, and from random
     initialisation as a control, for the same schedule; evaluate bbox and segm AP on its val split;
  4. write OUTPUT/report.md (AP table, mean ± std over seeds, CrossMAE minus MAE paired by seed, pretraining
     time, decoder GFLOPs) and PNGs: AP bars, loss curves, reconstruction grids, val images with predicted masks.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402

METHODS = ("mae", "crossmae")
DEMO_CONFIGS = ROOT / "configs" / "demo"

# Per size: the pretraining overrides (over configs/pretrain/<method>_vit_tiny_cpu.yaml), the detection
# config and schedule. "tiny" is tuned for a 2-core CPU; "smoke" is the pipeline in miniature (tests);
# "small" and "base" are for a CUDA device.
SIZES = {
    "smoke": {"model": "vit_tiny_patch16",
              "pretrain": {"epochs": 1, "warmup_epochs": 1, "builtin_size": 8, "batch_size": 4, "input_size": 32,
                           "decoder_depth": 2, "num_workers": 0, "vis_every": 1,
                           "model_kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2, "decoder_embed_dim": 32,
                                            "decoder_num_heads": 2}},
              "det_config": "mask_rcnn_vit_smoke_builtin.py", "det_iters": 2, "det_overrides": [],
              "crossmae_prediction_ratio": 0.25},
    "tiny": {"model": "vit_tiny_patch16",
             "pretrain": {"epochs": 6, "warmup_epochs": 1, "builtin_size": 1024, "batch_size": 32, "input_size": 96},
             "det_config": "mask_rcnn_vit_tiny_builtin.py", "det_iters": 450, "det_overrides": [],
             "det_steps": True, "crossmae_prediction_ratio": 0.25},
    "small": {"model": "vit_small_patch16",
              "pretrain": {"epochs": 100, "warmup_epochs": 10, "builtin_size": 16384, "batch_size": 128,
                           "input_size": 224, "device": "cuda", "num_workers": 8},
              "det_config": "mask_rcnn_vit_tiny_builtin.py", "det_iters": 3000,
              "det_overrides": ["model.backbone.net.embed_dim=384", "model.backbone.net.num_heads=6",
                                "train.device=cuda"],
              "det_steps": True, "crossmae_prediction_ratio": 0.25},
}


def log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def pretrain_config(method: str, size: dict, run_dir: Path, seed: int) -> dict:
    """The validated pretraining config of `method` at `size`: its CPU recipe with the size's overrides."""
    from pretrain.config import DEFAULTS, validate

    recipe = yaml.safe_load((ROOT / "configs" / "pretrain" / f"{method}_vit_tiny_cpu.yaml").read_text())
    cfg = {**DEFAULTS, **recipe, "num_workers": 2, **size["pretrain"], "model": f"{method}_{size['model']}",
           "output_dir": str(run_dir), "seed": seed, "resume": "auto"}
    if method == "crossmae":
        cfg["prediction_ratio"] = size["crossmae_prediction_ratio"]
    validate(cfg)
    return cfg


def _settings(cfg: dict) -> dict:
    """What a run's results depend on, in JSON form: its config without where it was written."""
    return json.loads(json.dumps({k: v for k, v in cfg.items() if k not in ("output_dir", "resume")}))


def _check_reusable(run_dir: Path, stored: dict, wanted: dict) -> None:
    """Refuse to reuse a finished step that was made with other settings (or by an older demo)."""
    if stored == wanted:
        return
    def show(old, new) -> str:
        if isinstance(old, list) and isinstance(new, list):  # override lists: only the items that differ
            old, new = [x for x in old if x not in new], [x for x in new if x not in old]
        return f"{old} -> {new}"

    diff = [f"{k}: {show(stored.get(k, 'not recorded'), wanted.get(k))}" for k in sorted(wanted)
            if stored.get(k) != wanted.get(k)]
    raise SystemExit(f"error: {run_dir} was made with other settings than this run ({'; '.join(diff)[:300]}); "
                     "start over with --fresh or write to another --output")


def pretrain(method: str, size: dict, out: Path, seed: int) -> dict:
    """Run (or reuse) one pretraining; returns {"time_s", "final_loss", "checkpoint"}."""
    from pretrain.trainer import run

    run_dir = out / "pretrain" / method
    summary = run_dir / "summary.json"
    cfg = pretrain_config(method, size, run_dir, seed)
    if summary.is_file():
        info = json.loads(summary.read_text())
        _check_reusable(run_dir, _settings(info.get("config", {})), _settings(cfg))
        log(f"pretrain {method} (seed {seed}): done before, reusing {run_dir}")
        return info
    log(f"pretrain {method} (seed {seed}): {cfg['model']}, {cfg['epochs']} epochs on {cfg['builtin_size']} built-in images")
    t0 = time.time()
    result = run(cfg)
    elapsed = time.time() - t0
    losses = [e["loss"] for e in result["epochs"]]
    info = {"time_s": elapsed, "final_loss": losses[-1] if losses else None,
            "checkpoint": str(run_dir / "checkpoint-last.pth"), "config": cfg}
    summary.write_text(json.dumps(info, indent=2))
    return info


def decoder_gflops(method: str, size: dict) -> float:
    """Decoder GFLOPs per image (fvcore) of the pretraining model, at its input size."""
    from pretrain.flops import count_flops
    from pretrain.models import build_model

    extra = dict(size["pretrain"].get("model_kwargs", {}))
    if "decoder_depth" in size["pretrain"]:
        extra["decoder_depth"] = size["pretrain"]["decoder_depth"]
    if method == "crossmae":
        extra["prediction_ratio"] = size["crossmae_prediction_ratio"]
    model = build_model(f"{method}_{size['model']}", img_size=size["pretrain"]["input_size"], **extra)
    imgs = torch.zeros(1, 3, size["pretrain"]["input_size"], size["pretrain"]["input_size"])
    noise = torch.rand(1, model.patchify(imgs).shape[1], generator=torch.Generator().manual_seed(0))
    return count_flops(model, imgs, noise)["decoder"]


def convert(method: str, ckpt: str, out: Path) -> Path:
    """Pretraining checkpoint -> detectron2 checkpoint with backbone.net.* keys."""
    from detection.checkpoint import convert_state_dict, extract_state_dict, to_detectron2_checkpoint

    target = out / "pretrain" / method / "d2_init.pth"
    if not target.is_file():
        sd = extract_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
        new_sd, used, ignored = convert_state_dict(sd)
        torch.save(to_detectron2_checkpoint(new_sd, ckpt), target)
        log(f"convert {method}: {len(used)} encoder tensors kept, {len(ignored)} decoder/other keys dropped")
    return target


def schedule_overrides(size: dict) -> list[str]:
    """train_net overrides that fit the detection schedule to `size["det_iters"]` iterations.

    The configs place the learning-rate steps for their own `train.max_iter`; a shorter run would never reach
    them. With "det_steps", the two drops (x0.1 each) land at 8/9 and 26/27 of the run, ViTDet's positions,
    after a warm-up of at most 25 iterations. Evaluation runs once, after the last iteration.
    """
    iters = size["det_iters"]
    overrides = [f"train.max_iter={iters}", "train.eval_period=0"]
    if size.get("det_steps"):
        milestones = sorted({min(round(iters * f), iters - 1) for f in (8 / 9, 26 / 27)})
        if len(milestones) < 2:
            raise SystemExit(f"error: --det-iters {iters} is too short for two learning-rate steps; use at least 20")
        overrides += [f"lr_multiplier.scheduler.milestones={milestones}",
                      f"lr_multiplier.scheduler.num_updates={iters}",
                      f"lr_multiplier.warmup_length={min(25, iters // 10) / iters}"]
    return overrides


def det_overrides(size: dict, pretrain_img: int) -> list[str]:
    """train_net overrides of `size` over its detection config: schedule, backbone shape, device."""
    return [*schedule_overrides(size), f"model.backbone.net.pretrain_img_size={pretrain_img}", *size["det_overrides"]]


def finetune(name: str, init: Path | None, run_dir: Path, size: dict, seed: int, pretrain_img: int) -> dict:
    """Mask R-CNN on the built-in shapes through tools/train_net.py into `run_dir`; returns its ap.json."""
    ap = run_dir / "ap.json"
    settings = {"config": size["det_config"], "init": "pretrained" if init else "random", "seed": seed,
                "overrides": det_overrides(size, pretrain_img)}
    if ap.is_file():
        result = json.loads(ap.read_text())
        _check_reusable(run_dir, result.get("settings", {}), settings)
        log(f"detection {name} (seed {seed}): done before, reusing {run_dir}")
        return result
    cmd = [sys.executable, str(ROOT / "tools" / "train_net.py"), "--config-file", str(DEMO_CONFIGS / size["det_config"]),
           f"train.output_dir={run_dir}", f"train.init_checkpoint={init or ''}", f"train.seed={seed}",
           f"dataloader.evaluator.output_dir={run_dir / 'inference'}", *settings["overrides"]]
    log(f"detection {name} (seed {seed}): {size['det_iters']} iterations from {init or 'random initialisation'}")
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    result = json.loads(ap.read_text())
    result["time_s"] = time.time() - t0
    result["settings"] = settings
    ap.write_text(json.dumps(result, indent=2))
    return result


def val_files(size: dict) -> tuple[str, str]:
    """COCO json and image folder of the detection config's val split (as train_net saw them)."""
    import detection  # noqa: F401  (compat layer before detectron2)
    from detectron2.config import LazyConfig
    from detectron2.data import MetadataCatalog

    cfg = LazyConfig.load(str(DEMO_CONFIGS / size["det_config"]))  # registers the built-in sets
    meta = MetadataCatalog.get(cfg.dataloader.test.dataset.names)
    return meta.json_file, meta.image_root


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", default="demo_output", help="where everything is written (default demo_output)")
    p.add_argument("--size", choices=sorted(SIZES), default="tiny",
                   help="tiny: 2-core CPU, ~15 min; small: a CUDA device; smoke: seconds, the pipeline in miniature")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="one full run (pretraining and detection) per seed; the report gives mean ± std "
                        "(default: 0; `--seeds 0 1 2` takes three times as long)")
    p.add_argument("--pretrain-epochs", type=int, help="override the size's pretraining epochs")
    p.add_argument("--det-iters", type=int, help="override the size's detection iterations")
    p.add_argument("--fresh", action="store_true", help="delete OUTPUT first instead of reusing finished steps")
    args = p.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        raise SystemExit(f"error: --seeds {' '.join(map(str, args.seeds))} repeats a seed; give distinct seeds")
    size = json.loads(json.dumps(SIZES[args.size]))
    if args.pretrain_epochs:
        size["pretrain"]["epochs"] = args.pretrain_epochs
        size["pretrain"]["warmup_epochs"] = min(size["pretrain"]["warmup_epochs"], args.pretrain_epochs)
    if args.det_iters:
        size["det_iters"] = args.det_iters
    schedule_overrides(size)  # a bad --det-iters fails here, not after pretraining
    out = Path(args.output).resolve()  # summaries store checkpoint paths: valid from any working directory
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    gflops = {m: decoder_gflops(m, size) for m in METHODS}
    names = {"random init": None, "MAE": "mae", "CrossMAE": "crossmae"}
    results: dict[str, list[dict]] = {n: [] for n in names}
    run_dirs: dict[str, list[Path]] = {n: [] for n in names}
    pre: dict[str, list[dict]] = {m: [] for m in METHODS}
    for seed in args.seeds:
        seed_out = out / f"seed{seed}"
        for m in METHODS:
            pre[m].append(pretrain(m, size, seed_out, seed))
        inits = {m: convert(m, pre[m][-1]["checkpoint"], seed_out) for m in METHODS}
        for name, method in names.items():
            run_dir = seed_out / "detection" / (method or "random_init")
            results[name].append(finetune(name, inits.get(method), run_dir, size, seed,
                                          size["pretrain"]["input_size"]))
            run_dirs[name].append(run_dir)

    gt_json, image_root = val_files(size)
    from detection.report import write_report

    report = write_report(out, results, run_dirs, pre, gflops, size, args.seeds, time.time() - t_start, gt_json,
                          image_root)
    print(report)


if __name__ == "__main__":
    main()
