"""The whole path on one machine: does a CrossMAE backbone detect and segment as well as an MAE one, for less
pretraining compute?

Per seed, into OUTPUT/seed<S>/, every step reused when its output exists (rerun to continue after an
interruption, or with more seeds to add runs; --fresh starts over):
  1. self-pretraining: MAE and CrossMAE side by side on the detection set's own train images (labels unused),
     same images, data order, optimizer steps and absolute learning rate, and the same step-0 encoder
     (SEED/pretrain/init.pth, MAE's initial weights at this seed, written first); weights-only snapshots along
     the way, step 0 included;
  2. transfer against compute: every snapshot's frozen encoder on the object probe (k-NN and linear, the spatial
     token grid of each ground-truth box crop) and its held-out reconstruction loss, against pretraining FLOPs
     and wall time; each final encoder (and the step-0 one) also read the way the detector reads it, the
     detector-view probe (whole image through the converted ViTDet backbone, RoIs at the boxes);
  3. Mask R-CNN fine-tuned from each final encoder, from the step-0 encoder (the matched control: the very
     weights both pretrainings started from, converted the same way) and from ViTDet's random init (a second
     control); optionally also with the backbone frozen;
  4. OUTPUT/report.md and report.json (every metric per seed, mean ± std, differences paired by seed) and PNGs;
     a preset whose detection stage has not been shown to rank backbones (`ranks_backbones: false`) gets its AP
     table labelled a pipeline check, with the evidence.

A preset (configs/demo/<name>.yaml) holds every setting; `--budget NAME` merges the preset's `budgets: NAME:`
over it, and writes to OUTPUT/<budget>/ unless --output says otherwise; a second demo into an OUTPUT in use is
refused (each pretraining and detector also holds its own folder). Steps run two at a time (`--jobs`),
each on half the threads, under one progress bar per seed; every run's own output goes to its log file.

Modules, in the order a run uses them: `presets` (presets, budgets, --set), `data` (the detection set's files,
pretraining images, object crops), `pretraining`, `curves`, `detector_view`, `detectors`, `scheduler` (dependent
tasks on worker processes), `pipeline` (a seed's tasks, the whole run), and the report: `stats`, `figures`,
`report`; `labels` and `reuse` serve them all. Imports `pretrain` and `detection`; nothing imports it but
`workflows.cli`.
"""
