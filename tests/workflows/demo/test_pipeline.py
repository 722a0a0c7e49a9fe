"""`make demo` in miniature (`workflows.demo.pipeline`, conftest's report_dir: the smoke preset, once per session):
both methods self-pretrained from one step-0 encoder, the snapshots evaluated, converted, four detectors fine-tuned,
the report written; a rerun reuses every finished step, and a step made with other settings is refused."""
import json

import pytest
import torch

from pretrain.errors import ConfigError
from workflows import cli
from workflows.demo import pipeline, presets

pytestmark = pytest.mark.slow  # every test reads the smoke demo's output (report_dir)
DETECTORS = ("vitdet_random", "step0", "mae", "crossmae")


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


def test_report_files_exist_and_show_all_runs(report_dir):
    for name in ("report.md", "report.json", "transfer_vs_compute.png", "ap_bars.png", "det_loss.png",
                 "pretrain_loss.png", "recon_mae.png", "recon_crossmae.png", "predictions.png"):
        assert (report_dir / name).stat().st_size > 0, name
    text = (report_dir / "report.md").read_text()
    for row in ("| ViTDet random init |", "| not pretrained (step 0) |", "| MAE |", "| CrossMAE |"):
        assert row in text
    assert "decoder GFLOPs" in text and "equal compute" in text and "equal steps" in text
    report = json.loads((report_dir / "report.json").read_text())
    run = report["runs"][0]
    assert set(run["detection"]) == set(DETECTORS) and set(run["curves"]) == {"mae", "crossmae"}
    for m in ("mae", "crossmae"):
        for point in run["curves"][m]:
            assert {"step", "pretrain_tflops", "pretrain_s", "knn", "linear", "heldout_loss"} <= set(point)
    # the detector-view probe of each final encoder, read from its converted weights, with the last block's health
    assert set(run["detector_view"]) == {"step0", "mae", "crossmae"}
    for key, view in run["detector_view"].items():
        assert view["settings"]["weights"].endswith(f"d2_{key}.pth") and view["view"] == "detector"
        assert 0 <= view["knn"]["accuracy"] <= 1 and 0 <= view["linear"]["accuracy"] <= 1
        assert view["feature_health"][-1]["token_norm"] > 0
    assert "## Frozen encoder as the detector reads it" in text
    assert "## Mask R-CNN on the val split: a pipeline check, not a ranking" in text
    assert report["detection_ranks_backbones"] is False


def test_both_methods_start_from_one_encoder_and_take_the_same_steps(report_dir):
    seed0 = report_dir / "seed0" / "pretrain"
    a = _weights(seed0 / "mae" / "snapshots" / "step-0000000.pth")
    b = _weights(seed0 / "crossmae" / "snapshots" / "step-0000000.pth")
    init = _weights(seed0 / "init.pth")  # written first, so that the two runs can start side by side
    encoder = [k for k in b if k.startswith(("blocks.", "patch_embed.", "cls_token", "pos_embed"))]
    assert encoder and all(torch.equal(a[k], b[k]) and torch.equal(init[k], a[k]) for k in encoder)
    # MAE's step 0 is the model the trainer itself creates at this seed: init.pth only pins it down
    assert all(torch.equal(init[k], a[k]) for k in init)
    steps = {m: [p.name for p in sorted((seed0 / m / "snapshots").glob("step-*.pth"))] for m in ("mae", "crossmae")}
    assert steps["mae"] == steps["crossmae"] and len(steps["mae"]) == 3
    configs = {m: json.loads((seed0 / m / "summary.json").read_text())["config"] for m in ("mae", "crossmae")}
    assert configs["mae"]["lr_prediction_scale"] == configs["crossmae"]["lr_prediction_scale"] == "none"
    assert configs["mae"]["blr"] == configs["crossmae"]["blr"] and configs["crossmae"]["prediction_ratio"] == 0.25
    # the same encoder gives the same frozen features: the step-0 point of both curves is one measurement
    run = json.loads((report_dir / "report.json").read_text())["runs"][0]
    first = [run["curves"][m][0] for m in ("mae", "crossmae")]
    assert first[0]["knn"] == first[1]["knn"] and first[0]["linear"] == first[1]["linear"]
    assert first[0]["pretrain_tflops"] == 0 and run["curves"]["mae"][-1]["pretrain_tflops"] > \
        run["curves"]["crossmae"][-1]["pretrain_tflops"] > 0  # same steps, CrossMAE's decoder is cheaper


def test_each_detector_was_trained_from_its_own_initialisation(report_dir):
    seed0 = report_dir / "seed0"
    for name in DETECTORS:
        ap = json.loads((seed0 / "detection" / name / "ap.json").read_text())
        assert set(ap["bbox"]) >= {"AP", "AP50", "AP75"} and set(ap["segm"]) >= {"AP", "AP50", "AP75"}
    # 14 smoke iterations at lr <= 2e-4 move no backbone weight by more than ~3e-3: each detector's backbone must
    # still be the encoder it was converted from, tensor by tensor, and the random control's must not
    random = _weights(seed0 / "detection" / "vitdet_random" / "model_final.pth")
    inits = {name: _weights(seed0 / "pretrain" / f"d2_{name}.pth") for name in ("step0", "mae", "crossmae")}
    for name, init in inits.items():
        final = _weights(seed0 / "detection" / name / "model_final.pth")
        assert init and all(k.startswith("backbone.net.") for k in init)
        for k, v in init.items():
            assert (final[k] - v).abs().max() < 1e-2, (name, k)
        assert max((random[k] - v).abs().max() for k, v in init.items()) > 0.05
    step0 = _weights(seed0 / "pretrain" / "mae" / "snapshots" / "step-0000000.pth")
    assert torch.equal(inits["step0"]["backbone.net.blocks.0.attn.qkv.weight"], step0["blocks.0.attn.qkv.weight"])


def test_rerun_reuses_finished_steps_and_a_second_seed_gives_the_spread(report_dir, capsys):
    assert cli.demo(["--size", "smoke", "--output", str(report_dir), "--seeds", "0", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("done before, reusing") == 6  # seed 0: 2 pretrainings + 4 detectors; seed 1 is new
    assert out.count("detector view") == 3  # seed 1's three encoders; seed 0's are read from their cache
    report = json.loads((report_dir / "report.json").read_text())
    assert report["seeds"] == [0, 1] and [r["seed"] for r in report["runs"]] == [0, 1]
    aps = [r["detection"]["mae"]["bbox"]["AP"] for r in report["runs"]]
    text = (report_dir / "report.md").read_text()
    assert "2 seeds (0, 1)" in text
    mean, std = sum(aps) / 2, abs(aps[0] - aps[1]) / 2 ** 0.5  # sample std of two values
    assert f"| MAE | {mean:.1f} ± {std:.1f}" in text and f"| MAE | {aps[0]:.1f} / " in text
    diff = report["ap_differences"]["bbox AP: CrossMAE - MAE"]
    assert diff["n"] == 2 and diff["per_seed"] == pytest.approx(
        [r["detection"]["crossmae"]["bbox"]["AP"] - r["detection"]["mae"]["bbox"]["AP"] for r in report["runs"]])
    assert "2 seeds: std" in text


def test_finished_steps_made_with_other_settings_are_refused_not_reused(report_dir, monkeypatch):
    before = (report_dir / "seed0" / "detection" / "mae" / "ap.json").read_text()
    real = presets.load_preset

    def changed(section, key, value):
        def load(name, budget=None):
            preset = real(name, budget)
            preset[section][key] = value
            return preset
        return load

    monkeypatch.setattr(pipeline, "load_preset", changed("detection", "iters", 15))
    with pytest.raises(ConfigError, match=r"detection/vitdet_random was made with other settings .*max_iter=14.*"
                                          r"--fresh"):
        pipeline.run(report_dir, "smoke")
    monkeypatch.setattr(pipeline, "load_preset", changed("pretrain", "epochs", 3))
    with pytest.raises(ConfigError, match=r"pretrain/mae was made with other settings .*epochs: 2 -> 3"):
        pipeline.run(report_dir, "smoke")
    # the shared step-0 weights too: another input size must not start from a resampled old init
    monkeypatch.setattr(pipeline, "load_preset", changed("pretrain", "input_size", 48))
    with pytest.raises(ConfigError, match=r"init.pth was made with other settings .*input_size: 32 -> 48"):
        pipeline.run(report_dir, "smoke")
    assert (report_dir / "seed0" / "detection" / "mae" / "ap.json").read_text() == before
