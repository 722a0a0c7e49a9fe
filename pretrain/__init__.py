"""Masked-image pretraining (MAE and CrossMAE) of ViT backbones: the project's core library.

Sub-packages, each importing only those listed before it (and the shared modules `errors`, `files`,
`distributed`, `sharded`):

- `models`: the shared ViT encoder, MAE's and CrossMAE's decoders, the registry of named sizes;
- `data`: images in (ImageNet-layout folders, image files, webdataset shards, the procedural shapes renderer),
  transforms, masks;
- `weights`: every MAE-family weights layout, released weights by name, reading a file into an encoder or a
  model, fitting an encoder to a target's grid and patch;
- `analysis`: decoder attention, reconstruction figures and the tools' reports;
- `training`: configuration and recipes, optimizer, lr schedule, the epoch loop, resume checkpoints, the trainer;
- `evaluation`: frozen features, the k-NN and linear probes, object crops, FLOP counts.

`cli` holds the command lines; `cluster` the SLURM launch through submitit. Nothing here imports `detection` or `workflows`.
"""
