"""Pretraining: configuration and recipes (`config`), the optimizer (`optim`), the warm-up + cosine schedule
shared with the probe (`schedule`), one epoch (`engine`), resume checkpoints (`checkpoint`), FSDP2 and activation
checkpointing with sharded checkpoint folders (`sharding`) and the run (`trainer`). Imports `models`, `data`, `weights`, `analysis.figures` and the shared modules."""
