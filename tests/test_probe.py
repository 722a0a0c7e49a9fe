"""The frozen-feature probe: k-NN against a direct computation, the linear probe on separable data, features,
object crops, the command line (cache, errors) and extraction across two processes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from detection.datasets import write_builtin_shapes
from pretrain.models import create_model
from pretrain.training.config import DEFAULTS
from pretrain.errors import ConfigError
from pretrain.evaluation import features as features_module
from pretrain.evaluation.features import encoder_features
from pretrain.evaluation.objects import ObjectCrops
from pretrain.evaluation.probe import accuracy, knn_classify, linear_probe
from pretrain.weights.loading import export_encoder, load_encoder
from workflows import cli

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32, decoder_num_heads=2)


def _checkpoint(path: Path, name: str = "mae_vit_tiny_patch16") -> Path:
    cfg = {**DEFAULTS, "model": name, "model_kwargs": TINY, "decoder_depth": 1, "input_size": 32}
    torch.manual_seed(0)
    torch.save({"model": create_model(cfg).state_dict(), "epoch": 3, "config": cfg}, path)
    return path


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("probe_shapes") / "set"
    write_builtin_shapes(folder, num_train=6, num_val=3, image_size=64, seed=1)
    return folder


def test_knn_equals_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(40, 6, generator=g), torch.randn(9, 6, generator=g)
    labels = torch.randint(0, 3, (40,), generator=g)
    got = knn_classify(train, labels, test, num_classes=3, k=5, temperature=0.1, chunk=4)
    for i, x in enumerate(test):
        sims = [float(x @ t / (x.norm() * t.norm())) for t in train]
        nearest = sorted(range(40), key=lambda j: -sims[j])[:5]
        votes = [sum(torch.exp(torch.tensor(sims[j] / 0.1)) for j in nearest if labels[j] == c) for c in range(3)]
        assert got[i] == max(range(3), key=lambda c: float(votes[c])), i


def test_linear_probe_separates_a_linearly_separable_set():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 20, generator=g)
    x = torch.randn(900, 20, generator=g) * 3 + 5  # off-centre and scaled: the BatchNorm must handle it
    y = (x - 5) @ w.T
    labels = y.argmax(1)
    margin = y.topk(2, dim=1).values
    keep = (margin[:, 0] - margin[:, 1]) > 3.0  # a clear margin between the best two classes
    x, labels = x[keep], labels[keep]
    n = len(x) * 2 // 3
    pred = linear_probe(x[:n], labels[:n], x[n:], num_classes=3, epochs=60, batch_size=64, blr=0.5,
                        warmup_epochs=5)
    assert accuracy(pred, labels[n:]) > 0.98
    # LARS scales each step to 0.001 x the weight's norm, so it wants a far larger rate (MAE: lr 6.4 at batch 16384)
    lars = linear_probe(x[:n], labels[:n], x[n:], num_classes=3, epochs=60, batch_size=64, blr=50.0,
                        warmup_epochs=5, optimizer="lars")
    assert accuracy(lars, labels[n:]) > 0.98
    shuffled = linear_probe(x[:n], labels[:n][torch.randperm(n, generator=g)], x[n:], num_classes=3, epochs=20)
    assert accuracy(shuffled, labels[n:]) < 0.7  # it learns the labels, not something about the inputs


def test_features_are_the_chosen_block_pooled(tmp_path):
    model, _ = load_encoder(_checkpoint(tmp_path / "m.pth"))
    imgs = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        maps = model.forward_features(imgs, torch.arange(16).expand(3, -1))
    spatial = encoder_features(model, imgs, block=0, pool="spatial")
    assert spatial.shape == (3, 16 * 32) and torch.equal(spatial, maps[1][:, 1:].flatten(1))
    assert torch.equal(encoder_features(model, imgs, pool="cls"), maps[-1][:, 0])
    torch.testing.assert_close(encoder_features(model, imgs, block=-1, pool="mean"), maps[2][:, 1:].mean(1))
    with pytest.raises(ConfigError, match="outside the encoder's 2 blocks"):
        encoder_features(model, imgs, block=2)


def test_an_exported_encoder_gives_the_features_of_its_model(tmp_path):
    src = _checkpoint(tmp_path / "m.pth")
    export_encoder(src, tmp_path / "enc.pth")
    full, info_full = load_encoder(src)
    enc, info = load_encoder(tmp_path / "enc.pth")
    assert info["family"] is None and info_full["family"] == "mae" and info["epoch"] == 3
    imgs = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(encoder_features(enc, imgs), encoder_features(full, imgs))


def test_object_crops_are_every_box_with_its_category(shapes):
    coco = json.loads((shapes / "annotations" / "val.json").read_text())
    crops = ObjectCrops(shapes / "annotations" / "val.json", shapes, input_size=32)
    assert len(crops) == len(coco["annotations"]) and crops.classes == ["circle", "square", "triangle", "star"]
    img, label = crops[0]
    assert img.shape == (3, 32, 32) and label == coco["annotations"][0]["category_id"] - 1
    assert crops.labels.tolist() == [a["category_id"] - 1 for a in coco["annotations"]]


def _probe_args(shapes: Path, ckpt: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [str(ckpt), "--dataset", "probe_t", str(shapes / "annotations" / "train.json"), str(shapes),
            "--dataset", "probe_v", str(shapes / "annotations" / "val.json"), str(shapes),
            "--train", "probe_t", "--val", "probe_v", "--epochs", "5", "--k", "3", "--device", "cpu", *extra]


def test_cli_writes_json_and_one_line_and_reuses_cached_features(shapes, tmp_path, capsys, monkeypatch):
    ckpt = _checkpoint(tmp_path / "m.pth")
    args = _probe_args(shapes, ckpt, tmp_path, "--cache-dir", str(tmp_path / "cache"), "--output",
                       str(tmp_path / "probe.json"))
    assert cli.probe(args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("m.pth: k-NN ") and "spatial features of block 1" in out[0]
    result = json.loads((tmp_path / "probe.json").read_text())
    assert result["train_samples"] == len(json.loads((shapes / "annotations" / "train.json").read_text())["annotations"])
    assert 0.0 <= result["knn"]["accuracy"] <= 1.0 and result["knn"]["k"] == 3 and result["feature_dim"] == 16 * 32
    assert len(list((tmp_path / "cache").glob("features-*.pt"))) == 2

    def no_extraction(*args, **kwargs):
        raise AssertionError("features were extracted again instead of read from the cache")

    monkeypatch.setattr(features_module, "extract_features", no_extraction)
    assert cli.probe(args) == 0
    assert json.loads((tmp_path / "probe.json").read_text()) == result


@pytest.mark.parametrize("case, message", [
    ("detectron2", "detectron2 (detection) checkpoint"),
    ("block", "--block 5 is outside the encoder's 2 blocks"),
    ("no_labels", "no labelled images"),
    ("broken_json", "is not valid JSON"),
])
def test_bad_input_is_a_one_line_error(case, message, shapes, tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "m.pth")
    args = _probe_args(shapes, ckpt, tmp_path)
    if case == "detectron2":
        torch.save({"model": {"backbone.net.patch_embed.proj.weight": torch.zeros(2, 3, 8, 8)}}, tmp_path / "d2.pth")
        args[0] = str(tmp_path / "d2.pth")
    elif case == "block":
        args += ["--block", "5"]
    elif case == "no_labels":
        (tmp_path / "folder" / "train").mkdir(parents=True)
        (tmp_path / "folder" / "val").mkdir()
        args = [str(ckpt), "--data-path", str(tmp_path / "folder")]
    else:
        (tmp_path / "bad.json").write_text("{not json")
        args = [str(ckpt), "--dataset", "probe_bad", str(tmp_path / "bad.json"), str(shapes), "--train", "probe_bad",
                "--val", "probe_bad"]
    assert cli.probe(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_two_processes_extract_the_same_features_as_one(shapes, tmp_path):
    ckpt = _checkpoint(tmp_path / "m.pth")
    base = _probe_args(shapes, ckpt, tmp_path, "--extract-batch-size", "2")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(ROOT / "tools" / "probe.py"), *base, "--output", str(tmp_path / "1.json"),
                          "--cache-dir", str(tmp_path / "c1")], env=env, capture_output=True, text=True, timeout=120)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29531", str(ROOT / "tools" / "probe.py"), *base, "--output", str(tmp_path / "2.json"),
                          "--cache-dir", str(tmp_path / "c2")], env=env, capture_output=True, text=True, timeout=180)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-2000:], two.stderr[-2000:])
    feats = [sorted((tmp_path / c).glob("features-*.pt")) for c in ("c1", "c2")]
    assert len(feats[0]) == len(feats[1]) == 2
    by_len = [{len(torch.load(f, weights_only=True)["features"]): torch.load(f, weights_only=True)["features"]
               for f in fs} for fs in feats]
    assert by_len[0].keys() == by_len[1].keys()
    for n in by_len[0]:
        torch.testing.assert_close(by_len[0][n], by_len[1][n])
    assert json.loads((tmp_path / "1.json").read_text())["knn"] == json.loads((tmp_path / "2.json").read_text())["knn"]
