"""The analysis tools (`pretrain.analysis.report` through `pretrain.cli`): reconstruction grids from any pretraining
checkpoint, the attention table and CrossMAE's feature weights, a wrong kind of file as a one-line error, and figures
written atomically."""
import csv
import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from PIL import Image

from pretrain import cli
from pretrain.analysis.figures import save_figure
from pretrain.analysis.attention import MASK, mae_attention_mass
from pretrain.data.images import Builtin, mask_noise, render_builtin_image
from pretrain.models import create_model
from pretrain.training.config import DEFAULTS
from pretrain.weights.loading import load_pretrain_model

TINY = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32, decoder_num_heads=2)
L = 16  # (32 / 8) ** 2 patches


def save_ours(path: Path, name: str, seed: int = 0) -> Path:
    """A checkpoint in this project's format, as `pretrain.training.trainer` writes it."""
    cfg = {**DEFAULTS, "model": name, "model_kwargs": TINY, "decoder_depth": 2, "input_size": 32}
    torch.manual_seed(seed)
    model = create_model(cfg)
    torch.save({"model": model.state_dict(), "optimizer": {}, "scaler": {}, "epoch": 0, "config": cfg}, path)
    return path


def _wrong_kind(tmp_path: Path, kind: str, tiny_model) -> Path:
    path = tmp_path / f"{kind}.pth"
    mae_sd = tiny_model("mae_vit_tiny_patch16").state_dict()
    if kind == "detectron2":
        torch.save({"model": {"backbone.net.blocks.0.attn.qkv.weight": torch.zeros(3, 1),
                              "roi_heads.box_predictor.cls_score.weight": torch.zeros(2, 1)}, "iteration": 5}, path)
    elif kind == "encoder_only":
        torch.save({"model": {k: v for k, v in mae_sd.items() if not k.startswith(("decoder", "mask_token"))},
                    "meta": {}}, path)
    elif kind == "not_a_checkpoint":
        path.write_text("hello\n")
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    return path


@pytest.mark.parametrize("kind, message", [
    ("detectron2", "detectron2"),
    ("encoder_only", "encoder only"),
    ("not_a_checkpoint", "not a torch checkpoint"),
    ("tensor", "not a checkpoint dict"),
    ("missing", "not found"),
])
@pytest.mark.parametrize("tool", [cli.visualize, cli.analyze_attention])
def test_wrong_kind_of_file_is_a_one_line_error(tmp_path, kind, message, tool, capsys, tiny_model):
    path = _wrong_kind(tmp_path, kind, tiny_model)
    assert tool([str(path), "--builtin", "1", "--output", str(tmp_path / "out"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_visualize_writes_reproducible_grids(tmp_path):
    ckpt = save_ours(tmp_path / "mae.pth", "mae_vit_tiny_patch16")

    def run(out: str, seed: int) -> list[Path]:
        assert cli.visualize([str(ckpt), "--builtin", "3", "--batch_size", "2", "--seed", str(seed),
                              "--output", str(tmp_path / out), "--device", "cpu"]) == 0
        return sorted((tmp_path / out).glob("recon_*.png"))

    a, b, c = run("a", 0), run("b", 0), run("c", 1)
    assert [p.name for p in a] == ["recon_00000.png", "recon_00002.png"]
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]  # same seed, same masks
    assert a[0].read_bytes() != c[0].read_bytes()
    assert Image.open(a[0]).size[0] > 100
    assert len((tmp_path / "a" / "images.tsv").read_text().splitlines()) == 1 + 3


def test_visualize_reads_a_folder_and_skips_unreadable_files(tmp_path, capsys):
    folder = tmp_path / "imgs" / "sub"
    folder.mkdir(parents=True)
    for i in range(2):
        Image.fromarray(render_builtin_image(i, 40)).save(folder / f"im{i}.png")
    (folder / "broken.jpg").write_bytes(b"not an image")
    ckpt = save_ours(tmp_path / "cross.pth", "crossmae_vit_tiny_patch16")
    assert cli.visualize([str(ckpt), str(tmp_path / "imgs"), "--output", str(tmp_path / "out"),
                          "--device", "cpu", "--prediction_ratio", "0.25"]) == 0
    written = list((tmp_path / "out").glob("recon_*.png"))
    assert len(written) == 1 and written[0].is_file()
    out = capsys.readouterr().out
    assert "skipped unreadable image" in out and "broken.jpg" in out and "2 images" in out
    assert cli.visualize([str(ckpt), str(tmp_path / "nowhere"), "--output", str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_analyze_attention_mae_writes_the_table(tmp_path):
    ckpt = save_ours(tmp_path / "mae.pth", "mae_vit_tiny_patch16")
    out = tmp_path / "att"
    assert cli.analyze_attention([str(ckpt), "--builtin", "5", "--batch_size", "2", "--seed", "4",
                                  "--output", str(out), "--device", "cpu"]) == 0
    for suffix in ("md", "csv", "json", "png"):
        assert (out / f"attention.{suffix}").is_file(), suffix
    result = json.loads((out / "attention.json").read_text())
    rows = result["rows"]
    assert result["images"] == 5 and [r["block"] for r in rows] == ["0", "1", "sum"]
    assert list(rows[0]) == ["block", "visible", "mask", "visible_mass", "mask_mass", "visible_patches_mass",
                             "cls_mass"]
    for r in rows[:2]:
        assert r["visible_mass"] + r["mask_mass"] == pytest.approx(1.0)
        assert r["visible_mass"] == pytest.approx(r["visible_patches_mass"] + r["cls_mass"])
    assert rows[2]["mask"] == pytest.approx(rows[0]["mask"] + rows[1]["mask"])
    assert (result["visible_keys"], result["mask_keys"], result["num_heads"]) == (5, 12, 2)
    assert "Table 6" in result["columns"]["visible, mask"]
    assert "Table 6" in (out / "attention.md").read_text()  # the table says which column is which

    model, _ = load_pretrain_model(ckpt)  # the same statistics, computed here in one batch
    images = Builtin(5, 32, seed=4)
    imgs = torch.stack([images[i][0] for i in range(5)])
    sums, count = mae_attention_mass(model, imgs, mask_noise(range(5), L, seed=4))
    assert rows[0]["mask_mass"] == pytest.approx(float(sums[0, MASK] / count), rel=1e-6)
    assert rows[0]["mask"] == pytest.approx(float(sums[0, MASK] / count) * 2 / 12, rel=1e-6)  # 2 heads, 12 keys
    with open(out / "attention.csv") as f:
        assert float(list(csv.DictReader(f))[1]["visible"]) == pytest.approx(rows[1]["visible"])


def test_analyze_attention_crossmae_reports_feature_weights(tmp_path, capsys):
    ckpt = save_ours(tmp_path / "cross.pth", "crossmae_vit_tiny_patch16", seed=3)
    out = tmp_path / "att"
    assert cli.analyze_attention([str(ckpt), "--output", str(out), "--device", "cpu"]) == 0
    assert "no self-attention between mask tokens" in capsys.readouterr().out
    assert (out / "feature_weights.png").is_file() and (out / "feature_weights.md").is_file()
    with open(out / "feature_weights.csv") as f:
        rows = list(csv.DictReader(f))
    table = np.array([[float(r[c]) for c in ("input", "block 0", "block 1")] for r in rows])
    weights = torch.load(ckpt, weights_only=True)["model"]["wfm.linear.weight"].numpy()
    np.testing.assert_allclose(table, weights, rtol=1e-6)
    assert not (out / "attention.json").exists()


def test_a_figure_that_fails_to_render_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "ap.png"
    path.write_bytes(b"earlier figure")
    fig = plt.figure()

    def broken(*args, **kwargs):
        if args and hasattr(args[0], "write"):
            args[0].write(b"half")
        else:
            Path(args[0]).write_bytes(b"half")
        raise RuntimeError("renderer failed")

    monkeypatch.setattr(fig, "savefig", broken)
    with pytest.raises(RuntimeError):
        save_figure(fig, path)
    assert path.read_bytes() == b"earlier figure" and [p.name for p in tmp_path.iterdir()] == ["ap.png"]
