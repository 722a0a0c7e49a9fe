#!/usr/bin/env bash
# Experiment record for docs/results/detection_transfer.md (not project code, not tested by the suite): an MAE
# pretraining variant from the demo's init with the demo's settings, converted to a detectron2 init for
# run_detector.sh. The base config is the demo's saved MAE config less the keys of its own run
# (lr_resolved, world_size, effective_batch_size, output_dir, init_from, overwrite); flags override it.
#
# usage: docs/results/detection_transfer/pretrain_variant.sh DEMO_SEED_DIR NAME [main_pretrain flags ...]
#   DEMO_SEED_DIR  a demo seed folder, e.g. DEMO_OUTPUT/seed0 (reads pretrain/mae/config.yaml and pretrain/init.pth)
#   NAME           variant name: pretraining in $OUT_ROOT/pretrain/NAME, detectron2 init $OUT_ROOT/inits/NAME.pth
#                  (skipped if that exists)
#   flags          tools/main_pretrain.py flags over the base, e.g. --blr 1e-3 or --no-norm_pix_loss; the base keeps
#                  the demo's data_path, so pass --data_path DEMO_OUTPUT/pretrain_images if the demo output moved
# Environment:
#   OUT_ROOT  where variants go (default ./detection_transfer_runs)
#   THREADS   OMP_NUM_THREADS of the pretraining (default 2)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
usage_unless 2 "$0" $#
seed_dir=$1; name=$2; shift 2
out_root=${OUT_ROOT:-./detection_transfer_runs}
out=$out_root/pretrain/$name
init=$out_root/inits/$name.pth
if [ -f "$init" ]; then echo "$name: converted before"; exit 0; fi
mkdir -p "$out" "$out_root/inits"
grep -v "lr_resolved\|world_size\|effective_batch_size\|output_dir\|init_from\|overwrite" \
  "$seed_dir/pretrain/mae/config.yaml" > "$out/base.yaml"
OMP_NUM_THREADS=${THREADS:-2} "$py" "$root/tools/main_pretrain.py" --config "$out/base.yaml" \
  --output_dir "$out" --init_from "$seed_dir/pretrain/init.pth" --resume auto --vis_every 1000 "$@" \
  > "$out/stdout.log" 2>&1
"$py" "$root/tools/convert_pretrain_to_d2.py" --config "$root/configs/demo/mask_rcnn_vit_tiny_builtin.py" \
  "$out/checkpoint-last.pth" "$init" > "$out/convert.log" 2>&1
tail -2 "$out/log.txt" | cut -c1-200
