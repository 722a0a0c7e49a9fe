"""Evaluation of pretrained encoders: frozen features (`features`), labelled object crops and ImageFolder splits
(`objects`), the k-NN and linear probes (`probe`), feature health (`health`), FLOP counts (`flops`).
Imports `models`, `data`, `weights`, `training.schedule` and the shared modules."""
