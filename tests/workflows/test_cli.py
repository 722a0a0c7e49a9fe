"""The workflows command lines (`workflows.cli`): the probe tool (JSON and one line, cached features, one-line errors,
extraction across two processes, no code run from a weights file, no file replaced without --overwrite), and the
demo's argument errors.

The weights-file case failed (ran the payload) before the fix it guards.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain.evaluation import features as features_module
from workflows import cli

ROOT = Path(__file__).resolve().parents[2]


def _tools(path: Path) -> dict:
    return {"probe": lambda: cli.probe([str(path), "--device", "cpu"])}


@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
@pytest.mark.parametrize("tool", ["probe"])
def test_no_tool_runs_code_from_a_weights_file(tool, suffix, hostile_weights, one_error_line):
    # (the pretraining and detection tools: tests/pretrain/test_cli.py, tests/detection/test_cli.py)
    path, marker = hostile_weights(suffix)
    assert _tools(path)[tool]() == 2
    assert not marker.exists(), f"{tool} ran the payload of {path.name}"
    one_error_line("--trust-pickle")


def _probe_args(shapes: Path, ckpt: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [str(ckpt), "--dataset", "probe_t", str(shapes / "annotations" / "train.json"), str(shapes),
            "--dataset", "probe_v", str(shapes / "annotations" / "val.json"), str(shapes),
            "--train", "probe_t", "--val", "probe_v", "--epochs", "5", "--k", "3", "--device", "cpu", *extra]


def test_cli_writes_json_and_one_line_and_reuses_cached_features(probe_shapes, tmp_path, capsys, monkeypatch,
                                                                 tiny_checkpoint):
    ckpt = tiny_checkpoint(tmp_path / "m.pth")
    args = _probe_args(probe_shapes, ckpt, tmp_path, "--cache-dir", str(tmp_path / "cache"), "--output",
                       str(tmp_path / "probe.json"))
    assert cli.probe(args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("m.pth: k-NN ") and "spatial features of block 1" in out[0]
    result = json.loads((tmp_path / "probe.json").read_text())
    train = json.loads((probe_shapes / "annotations" / "train.json").read_text())
    assert result["train_samples"] == len(train["annotations"])
    assert 0.0 <= result["knn"]["accuracy"] <= 1.0 and result["knn"]["k"] == 3 and result["feature_dim"] == 16 * 32
    assert len(list((tmp_path / "cache").glob("features-*.pt"))) == 2

    def no_extraction(*args, **kwargs):
        raise AssertionError("features were extracted again instead of read from the cache")

    monkeypatch.setattr(features_module, "extract_features", no_extraction)
    assert cli.probe([*args, "--overwrite"]) == 0
    assert json.loads((tmp_path / "probe.json").read_text()) == result


def test_compile_flag_reaches_the_feature_extraction(probe_shapes, tmp_path, monkeypatch, tiny_checkpoint):
    """`--compile` compiles the feature forward (that compiled features equal eager ones: test_features.py)."""
    real, seen = features_module.extract_features, []

    def recording(*args, compile=False, **kwargs):
        seen.append(compile)
        return real(*args, **kwargs)  # eager: compiling is the slow test's job

    monkeypatch.setattr(features_module, "extract_features", recording)
    assert cli.probe(_probe_args(probe_shapes, tiny_checkpoint(tmp_path / "m.pth"), tmp_path, "--compile")) == 0
    assert cli.probe(_probe_args(probe_shapes, tiny_checkpoint(tmp_path / "m.pth"), tmp_path)) == 0
    assert seen == [True, True, False, False]  # train and val features of each run


def test_cli_prints_and_writes_the_chance_levels_beside_the_accuracies(counted_objects, tmp_path, capsys,
                                                                      tiny_checkpoint):
    ckpt = tiny_checkpoint(tmp_path / "m.pth")
    args = [str(ckpt), "--dataset", "counted_t", str(counted_objects / "train.json"), str(counted_objects),
            "--dataset", "counted_v", str(counted_objects / "val.json"), str(counted_objects), "--train", "counted_t",
            "--val", "counted_v", "--epochs", "2", "--k", "3", "--device", "cpu", "--output", str(tmp_path / "p.json")]
    assert cli.probe(args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "(chance: 1/4 classes 0.250, majority class 'a' 0.400; spatial features" in out[0]
    result = json.loads((tmp_path / "p.json").read_text())
    assert result["chance"] == {"uniform": 0.25, "majority": 0.4, "majority_class": 0}
    assert result["classes"][result["chance"]["majority_class"]] == "a"


@pytest.mark.parametrize("case, message", [
    ("detectron2", "detectron2 (detection) checkpoint"),
    ("block", "--block 5 is outside the encoder's 2 blocks"),
    ("no_labels", "no labelled images"),
    ("broken_json", "is not valid JSON"),
    ("compiled_detector_view", "--compile compiles the crop view's encoder"),
])
def test_bad_input_is_a_one_line_error(case, message, probe_shapes, tmp_path, capsys, tiny_checkpoint):
    ckpt = tiny_checkpoint(tmp_path / "m.pth")
    args = _probe_args(probe_shapes, ckpt, tmp_path)
    if case == "detectron2":
        torch.save({"model": {"backbone.net.patch_embed.proj.weight": torch.zeros(2, 3, 8, 8)}}, tmp_path / "d2.pth")
        args[0] = str(tmp_path / "d2.pth")
    elif case == "block":
        args += ["--block", "5"]
    elif case == "compiled_detector_view":
        args += ["--view", "detector", "--config-file", str(ROOT / "configs/demo/mask_rcnn_vit_smoke_builtin.py"),
                 "--compile"]
    elif case == "no_labels":
        (tmp_path / "folder" / "train").mkdir(parents=True)
        (tmp_path / "folder" / "val").mkdir()
        args = [str(ckpt), "--data-path", str(tmp_path / "folder")]
    else:
        (tmp_path / "bad.json").write_text("{not json")
        args = [str(ckpt), "--dataset", "probe_bad", str(tmp_path / "bad.json"), str(probe_shapes), "--train",
                "probe_bad", "--val", "probe_bad"]
    assert cli.probe(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


@pytest.mark.parametrize("case, message", [("existing", "exists; pass --overwrite"), ("the input", "is also an input"),
                                           ("under a file", "is not a folder")])
def test_output_that_would_replace_a_file_or_cannot_be_written_is_refused_first(case, message, probe_shapes, tmp_path,
                                                                                 monkeypatch, tiny_checkpoint,
                                                                                 one_error_line):
    ckpt = tiny_checkpoint(tmp_path / "m.pth")
    (tmp_path / "kept.pth").write_bytes(ckpt.read_bytes())
    output, extra = {"existing": (tmp_path / "kept.pth", []), "the input": (ckpt, ["--overwrite"]),
                     "under a file": (ckpt / "probe.json", ["--overwrite"])}[case]

    def no_work(*args, **kwargs):
        raise AssertionError("the probe ran before checking its --output")

    monkeypatch.setattr(cli, "load_encoder", no_work)
    assert cli.probe(_probe_args(probe_shapes, ckpt, tmp_path, "--output", str(output), *extra)) == 2
    one_error_line(message)
    assert ckpt.read_bytes() == (tmp_path / "kept.pth").read_bytes()


@pytest.mark.slow  # one process, then two under torchrun
def test_two_processes_extract_the_same_features_as_one(probe_shapes, tmp_path, tiny_checkpoint):
    ckpt = tiny_checkpoint(tmp_path / "m.pth")
    base = _probe_args(probe_shapes, ckpt, tmp_path, "--extract-batch-size", "2")
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


def test_repeated_seed_and_unknown_budget_are_one_line_errors(tmp_path, capsys):
    assert cli.demo(["--size", "smoke", "--output", str(tmp_path), "--seeds", "1", "1"]) == 2
    assert cli.demo(["--size", "smoke", "--output", str(tmp_path), "--budget", "huge"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "repeats a seed" in err[0] and "no budget 'huge'" in err[1] and len(err) == 2


def test_set_items_of_repeated_flags_all_count(tmp_path, capsys):
    assert cli.demo(["--size", "smoke", "--output", str(tmp_path), "--set", "bogus.x=1", "--set", "probe.k=2"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "bogus" in err[0] and len(err) == 1  # the first --set was kept, not replaced by the second
