"""Sharded training data (`pretrain.data.shards`): the converter keeps class indices and file bytes and refuses in one
line; the stream reads every sample once an epoch (two workers, two ranks), repeats an epoch from its (seed, epoch),
skips and counts unreadable samples; pretraining runs and resumes on shards, with two processes too."""
import io
import json
import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
import yaml
from PIL import Image

from pretrain import cli as pretrain_cli
from pretrain.data.images import render_builtin_image
from pretrain.data.shards import INDEX, ShardedImages, ShardLoader, open_shards, shard_list, write_shards
from pretrain.errors import ConfigError, DataError, one_line
from pretrain.training.config import load_config
from pretrain.training import trainer
from pretrain.training.preempt import Preempted
from pretrain.training.run_folder import read_log
from pretrain.training.trainer import run

ROOT = Path(__file__).resolve().parents[3]


def _red(img: Image.Image) -> torch.Tensor:
    """A transform that keeps only the image's identity: its red level (each test image is one flat colour)."""
    return torch.tensor(img.getpixel((0, 0))[0])


def _image_folder(root: Path, n: int, classes=("cat", "ant", "bee")) -> Path:
    """`n` flat 8 px PNGs of red level 0..n-1, dealt round the classes (sorted: ant 0, bee 1, cat 2)."""
    for i in range(n):
        folder = root / classes[i % len(classes)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (i, 255 - i, 7)).save(folder / f"img.{i}.png")  # a dot in the stem, too
    return root


def _shard_folder(tmp_path: Path, n: int, shard_size: int) -> Path:
    write_shards(_image_folder(tmp_path / "src", n), tmp_path / "shards", shard_size)
    return tmp_path / "shards"


def _values(batches) -> list[int]:
    return [int(v) for imgs, _ in batches for v in imgs]


def test_the_converter_keeps_class_indices_and_bytes(tmp_path):
    src = _image_folder(tmp_path / "src", 10)
    index = write_shards(src, tmp_path / "out", shard_size=4, seed=1)
    assert index["classes"] == ["ant", "bee", "cat"] and index["samples"] == 10
    assert [s["samples"] for s in index["shards"]] == [4, 4, 2]
    assert json.loads((tmp_path / "out" / INDEX).read_text()) == index
    files = {p.read_bytes(): ["ant", "bee", "cat"].index(p.parent.name) for p in src.rglob("*.png")}
    seen = {}
    for shard in index["shards"]:
        with tarfile.open(tmp_path / "out" / shard["name"]) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        keys = {name.split(".")[0] for name in members}
        assert len(members) == 2 * len(keys) == 2 * shard["samples"]
        for key in keys:
            seen[members[f"{key}.png"]] = int(members[f"{key}.cls"])
    assert seen == files  # every file once, its bytes unchanged, its ImageFolder class index kept
    assert not list((tmp_path / "out").glob(".*"))  # no temporary file left


def test_the_converter_refuses_in_one_line(tmp_path, capsys, one_error_line):
    make = pretrain_cli.make_shards
    assert make([str(tmp_path / "missing"), str(tmp_path / "o")]) == 2
    one_error_line("missing does not exist")
    (tmp_path / "empty").mkdir()
    assert make([str(tmp_path / "empty"), str(tmp_path / "o")]) == 2
    one_error_line("no images in", "<class>/<image>")
    src = _image_folder(tmp_path / "src", 6)
    assert make([str(src), str(tmp_path / "o"), "--shard_size", "0"]) == 2
    one_error_line("--shard_size must be >= 1")
    assert make([str(src), str(tmp_path / "o"), "--prefix", "a/b"]) == 2
    one_error_line("no plain file name")
    assert make([str(src), str(src / "shards")]) == 2
    one_error_line("inside the ImageFolder")
    assert make([str(src), str(tmp_path / "o"), "--shard_size", "2"]) == 0
    assert "6 samples of 3 classes in 3 shards" in capsys.readouterr().out
    assert make([str(src), str(tmp_path / "o")]) == 2
    one_error_line("holds shards already", "--overwrite")
    assert make([str(src), str(tmp_path / "o"), "--shard_size", "4", "--overwrite"]) == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [INDEX, "train-000000.tar", "train-000001.tar"]


def test_every_sample_is_read_once_an_epoch_by_two_workers_of_each_of_two_ranks(tmp_path, monkeypatch):
    urls, counts, _ = shard_list(str(_shard_folder(tmp_path, 40, shard_size=5)))
    per_rank = {}
    for rank in (0, 1):  # what torchrun's two processes read, told apart as webdataset tells them: RANK, WORLD_SIZE
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        loader = ShardLoader(ShardedImages(urls, counts, _red, seed=0, shuffle_buffer=8), 4, world=2, num_workers=2)
        batches = list(loader)
        assert len(batches) == len(loader) == 5
        per_rank[rank] = _values(batches)
    assert sorted(per_rank[0] + per_rank[1]) == list(range(40))  # each sample once, in one rank only
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    one = ShardLoader(ShardedImages(urls, counts, _red, seed=0), 4, world=1, num_workers=2)
    assert sorted(_values(one)) == list(range(40)) and len(one) == 10


def test_an_epoch_repeats_from_seed_and_epoch_and_epochs_differ(tmp_path):
    urls, counts, _ = shard_list(str(_shard_folder(tmp_path, 24, shard_size=4)))
    orders = {}
    for epoch in (0, 1, 0):
        stream = ShardedImages(urls, counts, _red, seed=5, shuffle_buffer=6)
        stream.set_epoch(epoch)
        orders.setdefault(epoch, []).append([int(v) for v, _ in stream])
    assert orders[0][0] == orders[0][1] and sorted(orders[0][0]) == list(range(24))
    assert orders[1][0] != orders[0][0] and sorted(orders[1][0]) == list(range(24))


def test_unequal_shards_leave_the_same_number_of_batches_to_every_rank(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, "pretrain")
    urls, counts, _ = shard_list(str(_shard_folder(tmp_path, 22, shard_size=4)))  # 4, 4, 4, 4, 4, 2
    lengths = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        for epoch in range(3):
            loader = ShardLoader(ShardedImages(urls, counts, _red), 4, world=2, num_workers=0)
            loader.set_epoch(epoch)
            lengths.append(len(list(loader)))
    assert lengths == [2] * 6  # the least any rank can be dealt: 4 + 4 + 2 samples, two batches of 4
    assert "6 of 22 samples an epoch are left out" in caplog.text
    with pytest.raises(ConfigError, match="lower --num_workers"):
        ShardLoader(ShardedImages(urls, counts, _red), 4, world=2, num_workers=4)
    with pytest.raises(DataError, match="fewer than one batch"):
        ShardLoader(ShardedImages(urls, counts, _red), 16, world=2, num_workers=0)
    monkeypatch.delenv("WORLD_SIZE")  # processes started otherwise than by torchrun: webdataset would see one
    with pytest.raises(ConfigError, match="webdataset sees 1 process"):
        ShardLoader(ShardedImages(urls, counts, _red), 4, world=2, num_workers=0)


def _tar(path: Path, samples: list[dict]) -> None:
    with wds.TarWriter(str(path)) as tar:
        for sample in samples:
            tar.write(sample)


def _png(red: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (red, 0, 0)).save(buf, "PNG")
    return buf.getvalue()


def test_unreadable_samples_are_skipped_and_counted(tmp_path, caplog):
    good = [{"__key__": f"{i:03d}", "png": _png(i), "cls": 0} for i in range(6)]
    broken = {"__key__": "900", "png": b"\x89PNG\r\n\x1a\n not really a png", "cls": 0}
    no_class = {"__key__": "901", "png": _png(99)}
    _tar(tmp_path / "train-000000.tar", good[:2] + [broken] + good[2:3])
    _tar(tmp_path / "train-000001.tar", [no_class] + good[3:])
    index = {"format": 1, "classes": ["a"], "samples": 8,
             "shards": [{"name": "train-000000.tar", "samples": 4}, {"name": "train-000001.tar", "samples": 4}]}
    (tmp_path / INDEX).write_text(json.dumps(index))
    for workers in (0, 2):
        stream = open_shards(str(tmp_path), 8, shuffle_buffer=0, transform=_red)
        batches = list(ShardLoader(stream, 3, world=1, num_workers=workers))
        assert sorted(_values(batches)) == list(range(6))
        assert sum(int(n.sum()) for _, n in batches) == 2  # the broken image and the sample without .cls
    # (the workers' warnings go to their own stderr; these are the main process's, of the run without workers)
    assert "sample 900 of" in caplog.text and "sample 901 of" in caplog.text and "has no .cls" in caplog.text


def test_a_truncated_shard_stops_in_one_line_naming_it(tmp_path):
    folder = _shard_folder(tmp_path, 12, shard_size=4)
    shard = folder / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:1500])
    for workers in (0, 2):
        with pytest.raises(DataError) as e:
            list(ShardLoader(open_shards(str(folder), 8, shuffle_buffer=0, transform=_red), 2, 1, workers))
        assert f"shard {shard} cannot be read (truncated header); write the shards again" in one_line(e.value)


def test_shard_paths_and_their_errors(tmp_path):
    folder = _shard_folder(tmp_path, 12, shard_size=4)
    urls, counts, classes = shard_list(str(folder / "train-{000000..000001}.tar"))
    assert [Path(u).name for u in urls] == ["train-000000.tar", "train-000001.tar"] and counts == [4, 4]
    assert classes == ["ant", "bee", "cat"]
    with pytest.raises(DataError, match="not listed in"):
        shard_list(str(folder / "train-{000002..000003}.tar"))
    (folder / "train-000002.tar").unlink()
    with pytest.raises(DataError, match="train-000002.tar does not exist"):
        shard_list(str(folder))
    (folder / INDEX).unlink()
    with pytest.raises(DataError, match="no shards.json beside the shards"):
        shard_list(str(folder / "train-000000.tar"))
    assert load_config(["--shuffle_buffer", "0"])["shuffle_buffer"] == 0
    with pytest.raises(ConfigError, match="--shuffle_buffer must be >= 0"):
        load_config(["--shuffle_buffer", "-1"])


def _builtin_shards(tmp_path: Path, n: int = 16, shard_size: int = 4, broken: bool = False) -> Path:
    (tmp_path / "src" / "c").mkdir(parents=True)
    for i in range(n):
        Image.fromarray(render_builtin_image(i, 40)).save(tmp_path / "src" / "c" / f"{i}.jpg")
    if broken:
        (tmp_path / "src" / "c" / "broken.jpg").write_bytes(b"not an image")
    write_shards(tmp_path / "src", tmp_path / "shards", shard_size)
    return tmp_path / "shards"


def test_pretraining_on_shards_counts_the_unreadable_sample(tmp_path, tiny_cfg):
    cfg = tiny_cfg(tmp_path, data_path=str(_builtin_shards(tmp_path, broken=True)), epochs=1, shuffle_buffer=8)
    run(cfg)
    log = read_log(cfg["output_dir"])
    assert len(log) == 1 and log[0]["train_skipped_images"] == 1 and np.isfinite(log[0]["train_loss"])
    assert (Path(cfg["output_dir"]) / "recon" / "epoch_0000.png").is_file()


@pytest.mark.slow  # three trainings
def test_pretraining_on_shards_resumes_with_the_losses_of_an_unbroken_run(tmp_path, tiny_cfg):
    shards = _builtin_shards(tmp_path)
    whole = tiny_cfg(tmp_path / "whole", data_path=str(shards), epochs=3, shuffle_buffer=8)
    run(whole)
    part = tiny_cfg(tmp_path / "part", data_path=str(shards), epochs=1, shuffle_buffer=8)
    run(part)
    run({**part, "epochs": 3, "resume": "auto"})
    losses = [r["train_loss"] for r in read_log(whole["output_dir"])]
    np.testing.assert_allclose([r["train_loss"] for r in read_log(part["output_dir"])], losses, rtol=1e-6)
    assert len(set(losses)) == 3  # the comparison is not between constants


@pytest.mark.slow  # two processes under torchrun
def test_two_process_gloo_pretraining_on_shards(tmp_path, tiny_cfg):
    shards = _builtin_shards(tmp_path, n=18)  # shards of 4, 4, 4, 4, 2: a process may be dealt 4 + 2 samples
    out = tmp_path / "ddp"
    cfg = tiny_cfg(tmp_path, epochs=2, output_dir=str(out), batch_size=2, data_path=str(shards), num_workers=2)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({k: cfg[k] for k in ("model", "model_kwargs", "decoder_depth", "input_size",
                                                           "batch_size", "epochs", "warmup_epochs", "data_path",
                                                           "num_workers", "output_dir", "device", "seed")}))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           "29533", str(ROOT / "tools" / "main_pretrain.py"), "--config", str(recipe)],
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = read_log(out)
    assert len(log) == 2 and all(np.isfinite(r["train_loss"]) for r in log)
    assert "3 iterations/epoch" in proc.stderr and "6 of 18 samples an epoch are left out" in proc.stderr


@pytest.mark.parametrize("workers", [0, 2])
def test_a_preempted_run_on_shards_resumes_inside_the_epoch_with_the_losses_of_an_unbroken_run(
        tmp_path, tiny_cfg, monkeypatch, workers, signal_in_forward):
    shards = _builtin_shards(tmp_path)
    whole = tiny_cfg(tmp_path / "whole", data_path=str(shards), epochs=3, shuffle_buffer=8, num_workers=workers)
    run(whole)
    cfg = {**whole, "output_dir": str(tmp_path / "part")}
    signal_in_forward(trainer, "create_model", 5)  # epoch 1 (4 iterations each), iteration 1
    with pytest.raises(Preempted, match="in epoch 1 before iteration 2"):
        run(cfg)
    monkeypatch.undo()
    run({**cfg, "resume": "auto"})
    losses = [r["train_loss"] for r in read_log(whole["output_dir"])]
    assert [r["train_loss"] for r in read_log(cfg["output_dir"])] == losses
    assert len(set(losses)) == 3  # the comparison is not between constants


def test_shards_resumed_at_another_batch_size_start_the_stopped_epoch_again(tmp_path, tiny_cfg, monkeypatch, caplog,
                                                                            signal_in_forward):
    cfg = tiny_cfg(tmp_path, data_path=str(_builtin_shards(tmp_path)), epochs=2, shuffle_buffer=8)
    signal_in_forward(trainer, "create_model", 5)
    with pytest.raises(Preempted, match="in epoch 1 before iteration 2"):
        run(cfg)
    monkeypatch.undo()
    with caplog.at_level(logging.WARNING, logger="pretrain"):
        result = run({**cfg, "resume": "auto", "batch_size": 2})
    assert "epoch 1 starts again from its beginning" in caplog.text
    assert [s["epoch"] for s in result["epochs"]] == [1]
    log = read_log(cfg["output_dir"])
    assert [r["epoch"] for r in log] == [0, 1] and np.isfinite(log[1]["train_loss"])
