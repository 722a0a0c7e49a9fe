"""Which COCO-format files the object probe reads: the datasets train_net would read, by name."""
from __future__ import annotations

from collections.abc import Sequence

from detection.datasets import dataset_files, register_builtin_shapes, register_coco_json
from detection.lazyconfig import config_datasets


def object_sets(config_file: str | None, train: str | None, val: str | None,
                datasets: Sequence[Sequence[str]] = ()) -> tuple[tuple[str, str], tuple[str, str]]:
    """(json, image folder) of the probe's train and val sets.

    Names come from `train` / `val`, else from the LazyConfig's `dataloader.train` / `dataloader.test` (loading it
    registers the built-in sets it defines), else the default built-in shapes set. `datasets` are
    (NAME, JSON, IMAGE_ROOT) triples registered first, as `train_net --dataset`.
    """
    for name, json_file, image_root in datasets:
        register_coco_json(name, json_file, image_root)
    if config_file:
        files = config_datasets(config_file)
        return (dataset_files(train) if train else files[0]), (dataset_files(val) if val else files[1])
    if train is None or val is None:
        default_train, default_val = register_builtin_shapes()
        train, val = train or default_train, val or default_val
    return dataset_files(train), dataset_files(val)
