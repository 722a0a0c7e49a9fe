#!/usr/bin/env bash
# Experiment record for docs/results/detection_transfer.md (not project code, not tested by the suite): one Mask R-CNN
# fine-tuning run of configs/demo/mask_rcnn_vit_tiny_builtin.py with the demo's schedule overrides (LR steps at 8/9
# and 26/27 of ITERS, min(25, ITERS / 10) warm-up iterations, no evaluation until the end, one checkpoint), then its
# box and mask AP.
#
# usage: docs/results/detection_transfer/run_detector.sh NAME INIT ITERS SEED [KEY=VALUE ...]
#   NAME      run folder: $OUT_ROOT/NAME (train_net.log, model_final.pth, ap.json); skipped if ap.json is there
#   INIT      detectron2 checkpoint for train.init_checkpoint (e.g. DEMO_OUTPUT/seed0/pretrain/d2_mae.pth)
#   ITERS     train.max_iter
#   SEED      train.seed
#   KEY=VALUE further LazyConfig overrides, after the demo's (e.g. optimizer.lr=5e-4)
# Environment:
#   OUT_ROOT    where runs go (default ./detection_transfer_runs)
#   THREADS     OMP_NUM_THREADS of the run (default 2)
#   PYTHONPATH  kept: add folders with extra modules an override names, e.g. for the final-norm backbone
#               PYTHONPATH=docs/results/detection_transfer ... model.backbone.net._target_=vit_with_norm.ViTWithNorm
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
usage_unless 4 "$0" $#
name=$1; init=$2; iters=$3; seed=$4; shift 4
out=${OUT_ROOT:-./detection_transfer_runs}/$name
if [ -f "$out/ap.json" ]; then echo "$name: done before"; exit 0; fi
m1=$((iters * 8 / 9)); m2=$((iters * 26 / 27)); warm=$("$py" -c "print(min(25, $iters // 10) / $iters)")
mkdir -p "$out"
OMP_NUM_THREADS=${THREADS:-2} "$py" "$root/tools/train_net.py" \
  --config-file "$root/configs/demo/mask_rcnn_vit_tiny_builtin.py" --overwrite \
  train.output_dir="$out" train.init_checkpoint="$init" train.seed="$seed" \
  dataloader.evaluator.output_dir="$out/inference" \
  train.max_iter="$iters" train.eval_period=0 "lr_multiplier.scheduler.values=[1.0,0.1,0.01]" \
  "lr_multiplier.scheduler.milestones=[$m1,$m2]" lr_multiplier.scheduler.num_updates="$iters" \
  lr_multiplier.warmup_length="$warm" model.backbone.net.pretrain_img_size=96 train.checkpointer.period="$iters" \
  dataloader.train.num_workers=1 dataloader.test.num_workers=1 "$@" > "$out/train_net.log" 2>&1
"$py" - "$out/ap.json" "$name" <<'PY'
import json
import sys

r = json.load(open(sys.argv[1]))
print(sys.argv[2], "box", r["bbox"].get("AP"), "mask", r["segm"].get("AP"), "APs/m/l", r["bbox"].get("APs"),
      r["bbox"].get("APm"), r["bbox"].get("APl"))
PY
