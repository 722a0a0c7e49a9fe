"""Pretraining images (`pretrain.data.images`): the built-in images, folders of files, unreadable files replaced
and counted (sixteen in a row stop the run in one line), 16-bit and other modes read as 8-bit RGB, in-memory
caching, and the seeded mask noise of the analysis tools."""
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pretrain import cli as pretrain_cli
from pretrain.data.images import build_dataset, mask_noise, open_rgb, render_builtin_image
from pretrain.errors import DataError
from pretrain.training.run_folder import read_log
from pretrain.training.trainer import run

L = 16  # (32 / 8) ** 2 patches


def test_builtin_images_are_deterministic():
    a, b = render_builtin_image(7, 64, seed=1), render_builtin_image(7, 64, seed=1)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, render_builtin_image(8, 64, seed=1))
    assert a.std() > 10  # not a flat image


def test_data_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_dataset(str(tmp_path / "missing"), 32)
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match="train/<class>/<image>"):
        build_dataset(str(tmp_path / "flat"), 32)
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="no images under"):
        build_dataset(str(tmp_path / "empty"), 32)


def test_unreadable_images_are_replaced_and_counted(tmp_path):
    cls = tmp_path / "data" / "train" / "n01"
    cls.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(render_builtin_image(i, 48)).save(cls / f"ok{i}.png")
    (cls / "bad0.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")  # sorts first
    ds = build_dataset(str(tmp_path / "data"), 32)
    counts = [ds[i][1] for i in range(len(ds))]
    assert ds[0][0].shape == (3, 32, 32)
    assert sum(counts) == 1  # only the sample whose file is corrupt needed a replacement


def test_a_folder_of_images_trains_and_caching_changes_no_loss(tmp_path, tiny_cfg):
    # a flat folder (e.g. the detection set's train split) is a dataset; decoding once gives the same batches
    folder = tmp_path / "imgs" / "split"
    folder.mkdir(parents=True)
    for i in range(16):
        Image.fromarray(render_builtin_image(i, 40)).save(folder / f"{i:03d}.jpg")
    runs = {}
    for cache in (False, True):
        cfg = tiny_cfg(tmp_path / str(cache), data_path=str(tmp_path / "imgs"), cache_images=cache, epochs=1)
        run(cfg)
        runs[cache] = read_log(cfg["output_dir"])[0]["train_loss"]
    assert runs[True] == runs[False]
    ds = build_dataset(str(tmp_path / "imgs"), 32, cache_images=True)
    assert len(ds) == 16 and ds.pixels is not None and ds[3][0].shape == (3, 32, 32)


def test_a_16_bit_png_keeps_its_grey_levels(tmp_path):
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    img = np.asarray(open_rgb(tmp_path / "deep.png"))
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert abs(int(img[32, 0, 0]) - 128) <= 1 and img[0, 0, 0] == 0 and img[-1, -1, 0] == 255  # not all white
    assert np.all(np.diff(img[:, 0, 0].astype(int)) >= 0)
    Image.new("L", (8, 8), 77).save(tmp_path / "grey.png")
    Image.new("CMYK", (8, 8), (0, 0, 0, 0)).save(tmp_path / "cmyk.jpg")
    assert np.asarray(open_rgb(tmp_path / "grey.png"))[0, 0].tolist() == [77, 77, 77]
    assert open_rgb(tmp_path / "cmyk.jpg").mode == "RGB" and np.asarray(open_rgb(tmp_path / "cmyk.jpg")).min() > 240


def test_sixteen_unreadable_images_in_a_row_from_a_worker_are_one_line(tmp_path, tiny_cfg, one_error_line):
    folder = tmp_path / "data" / "train" / "c"
    folder.mkdir(parents=True)
    for i in range(20):
        (folder / f"{i:02d}.jpg").write_bytes(b"not an image")
    recipe = tmp_path / "r.yaml"
    cfg = tiny_cfg(tmp_path, num_workers=1, data_path=str(tmp_path / "data"))
    recipe.write_text(yaml.safe_dump({k: cfg[k] for k in ("model", "model_kwargs", "decoder_depth", "input_size",
                                                          "batch_size", "num_workers", "device", "data_path",
                                                          "epochs", "warmup_epochs")}))
    assert pretrain_cli.pretrain(["--config", str(recipe), "--output_dir", str(tmp_path / "o")]) == 2
    one_error_line("16 consecutive unreadable images")


def test_mask_noise_depends_only_on_seed_and_index():
    both = mask_noise([3, 7], L, seed=5)
    torch.testing.assert_close(both[1], mask_noise([7], L, seed=5)[0])
    assert not torch.equal(both[0], both[1]) and not torch.equal(both, mask_noise([3, 7], L, seed=6))
