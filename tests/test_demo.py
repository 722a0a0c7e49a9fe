"""`make demo` in miniature: pretrain both methods, convert, fine-tune three detectors, write the report."""
import json

import pytest
import torch

from detection.cli import compare_backbones
from pretrain.config import create_model
from pretrain.errors import ConfigError
from workflows import cli, demo


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    demo.run(out, "smoke")
    return out


def test_report_files_exist_and_show_all_runs(report_dir):
    for name in ("report.md", "ap_bars.png", "det_loss.png", "pretrain_loss.png", "recon_mae.png",
                 "recon_crossmae.png", "predictions.png"):
        assert (report_dir / name).stat().st_size > 0, name
    text = (report_dir / "report.md").read_text()
    for row in ("| random init |", "| MAE |", "| CrossMAE |"):
        assert row in text
    assert "decoder GFLOPs" in text


def test_each_detector_was_trained_from_its_own_initialisation(report_dir):
    seed0 = report_dir / "seed0"
    for name in ("random_init", "mae", "crossmae"):
        ap = json.loads((seed0 / "detection" / name / "ap.json").read_text())
        assert set(ap["bbox"]) >= {"AP", "AP50", "AP75"} and set(ap["segm"]) >= {"AP", "AP50", "AP75"}

    def weights(path):
        return torch.load(path, weights_only=True)["model"]

    # two smoke iterations at lr <= 2e-4 move no backbone weight by more than ~5e-4: each pretrained detector's
    # backbone must still be its converted encoder, tensor by tensor, and the control's must not
    random = weights(seed0 / "detection" / "random_init" / "model_final.pth")
    for method in ("mae", "crossmae"):
        init = weights(seed0 / "pretrain" / method / "d2_init.pth")
        final = weights(seed0 / "detection" / method / "model_final.pth")
        assert init and all(k.startswith("backbone.net.") for k in init)
        for k, v in init.items():
            assert (final[k] - v).abs().max() < 2e-3, (method, k)
        assert max((random[k] - v).abs().max() for k, v in init.items()) > 0.05


def test_rerun_reuses_finished_steps_and_a_second_seed_gives_the_spread(report_dir, capsys):
    assert cli.demo(["--size", "smoke", "--output", str(report_dir), "--seeds", "0", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("done before, reusing") == 5  # seed 0: 2 pretrainings + 3 detectors; seed 1 is new
    aps = {s: json.loads((report_dir / f"seed{s}" / "detection" / "mae" / "ap.json").read_text())["bbox"]["AP"]
           for s in (0, 1)}
    text = (report_dir / "report.md").read_text()
    assert "2 seeds (0, 1)" in text and "| MAE | " in text
    mean = sum(aps.values()) / 2
    std = abs(aps[0] - aps[1]) / 2 ** 0.5  # sample std of two values
    assert f"| MAE | {mean:.1f} ± {std:.1f}" in text
    assert f"| MAE | {aps[0]:.1f} / " in text  # the per-seed table
    assert "CrossMAE minus MAE: bbox AP" in text and "paired over 2 seeds" in text


def test_finished_steps_made_with_other_settings_are_refused_not_reused(report_dir):
    # A report mixing 2-iteration runs with a --det-iters 3 header (or other pretraining) would be wrong.
    before = (report_dir / "seed0" / "detection" / "mae" / "ap.json").read_text()
    with pytest.raises(ConfigError, match=r"detection/random_init was made with other settings .*max_iter=2.*--fresh"):
        demo.run(report_dir, "smoke", det_iters=3)
    with pytest.raises(ConfigError, match=r"pretrain/mae was made with other settings .*epochs: 1 -> 2"):
        demo.run(report_dir, "smoke", pretrain_epochs=2)
    assert (report_dir / "seed0" / "detection" / "mae" / "ap.json").read_text() == before


def test_repeated_seed_is_a_one_line_error(tmp_path, capsys):
    assert cli.demo(["--size", "smoke", "--output", str(tmp_path), "--seeds", "1", "1"]) == 2
    err = capsys.readouterr().err
    assert "repeats a seed" in err and err.count("\n") == 1


def test_compare_backbones_table_plot_and_errors(report_dir, tmp_path, capsys):
    runs = [str(report_dir / "seed0" / "detection" / n) for n in ("mae", "crossmae")]
    assert compare_backbones([*runs, "--names", "MAE", "CrossMAE", "--plot", str(tmp_path / "ap.png"),
                              "--markdown", str(tmp_path / "ap.md")]) == 0
    table, plot_line = capsys.readouterr().out.rsplit("\nplot: ", 1)
    assert plot_line.strip() == str(tmp_path / "ap.png")
    mae = json.loads((report_dir / "seed0" / "detection" / "mae" / "ap.json").read_text())
    cross = json.loads((report_dir / "seed0" / "detection" / "crossmae" / "ap.json").read_text())
    delta = cross["bbox"]["AP"] - mae["bbox"]["AP"]
    assert f"| CrossMAE | {cross['bbox']['AP']:.1f} ({delta:+.1f})" in table
    assert (tmp_path / "ap.png").stat().st_size > 0 and (tmp_path / "ap.md").read_text().strip() == table.strip()
    assert compare_backbones([str(tmp_path)]) == 2
    assert "ap.json not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse's usage error
        compare_backbones([*runs, "--names", "only-one"])
    assert "one name per dir" in capsys.readouterr().err


def test_top_detections_ranks_filters_and_cuts_per_image():
    from detection.report import top_detections

    res = [{"image_id": 1, "score": 0.2}, {"image_id": 1, "score": 0.9}, {"image_id": 2, "score": 0.95},
           {"image_id": 1, "score": 0.04}, {"image_id": 1, "score": 0.5}]
    assert [d["score"] for d in top_detections(res, 1, 2)] == [0.9, 0.5]
    assert [d["score"] for d in top_detections(res, 1, 10)] == [0.9, 0.5, 0.2]  # 0.04 is under min_score
    assert top_detections(res, 3, 5) == []


def test_mean_std_and_table_spread():
    from detection.report import ap_table, mean_std

    runs = [{"bbox": {"AP": 2.0, "AP50": 5.0, "AP75": None}, "segm": {"AP": 1.0, "AP50": 3.0, "AP75": 0.0}},
            {"bbox": {"AP": 4.0, "AP50": 7.0, "AP75": 1.0}, "segm": {"AP": 3.0, "AP50": 5.0, "AP75": 0.0}}]
    mean, std = mean_std(runs)
    assert mean["bbox"]["AP"] == 3.0 and abs(std["bbox"]["AP"] - 2 ** 0.5) < 1e-9
    assert "AP75" not in mean["bbox"]  # missing in one run: left out, shown as n/a
    table = ap_table(["a", "b"], [mean, {"bbox": {"AP": 1.0}, "segm": {}}], [std, {}])
    assert "| a | 3.0 ± 1.4 | 6.0 ± 1.4 | n/a | 2.0 ± 1.4 |" in table
    assert "| b | 1.0 (-2.0) | n/a" in table


def test_demo_schedule_steps_the_lr_inside_a_shortened_run():
    # The tiny config places its steps at 533 / 578 of 600 iterations: a 450-iteration run passed only
    # train.max_iter would never decay. schedule_overrides must move both steps (and the warm-up) inside it.
    from detectron2.config import LazyConfig, instantiate

    cfg = LazyConfig.load(str(demo.DEMO_CONFIGS / "mask_rcnn_vit_tiny_builtin.py"))
    size = {"det_iters": 450, "det_steps": True}
    cfg = LazyConfig.apply_overrides(cfg, demo.schedule_overrides(size))
    assert cfg.train.max_iter == 450 and cfg.train.eval_period == 0
    sched = instantiate(cfg.lr_multiplier)  # detectron2's LRMultiplier calls it with iteration / max_iter
    lr = [sched(i / 450) for i in range(450)]
    assert lr[0] < 0.01 and lr[100] == pytest.approx(1.0)
    assert lr[399] == pytest.approx(1.0) and lr[401] == pytest.approx(0.1) and lr[449] == pytest.approx(0.01)
    with pytest.raises(ConfigError, match="too short"):
        demo.schedule_overrides({"det_iters": 13, "det_steps": True})


@pytest.mark.parametrize("method", demo.METHODS)
def test_gpu_size_small_encoder_fits_its_detector(method, tmp_path):
    # `--size small` is meant for a CUDA device: a mismatch between its pretraining model and its detection
    # overrides would only show after the GPU pretraining. Build both here, on CPU, through the demo's own
    # config, conversion and override code, and check every converted tensor lands on a same-shaped one.
    from detectron2.config import LazyConfig, instantiate

    size = demo.load_preset("small")
    cfg = demo.pretrain_config(method, size, tmp_path / "run", seed=0)
    torch.save({"model": create_model(cfg).state_dict()}, tmp_path / "checkpoint.pth")
    (tmp_path / "pretrain" / method).mkdir(parents=True)  # where the pretraining would have written
    init = demo.convert(method, str(tmp_path / "checkpoint.pth"), tmp_path, size)
    converted = torch.load(init, weights_only=False)["model"]

    det_cfg = LazyConfig.load(str(demo.DEMO_CONFIGS / size["det_config"]))
    det_cfg = LazyConfig.apply_overrides(det_cfg, demo.det_overrides(size, cfg["input_size"]))
    assert det_cfg.train.device == "cuda"
    target = instantiate(det_cfg.model).state_dict()
    net = {k for k in target if k.startswith("backbone.net.") and "rel_pos" not in k}
    assert set(converted) == net  # every encoder tensor, and only those (rel_pos_* is ViTDet's, learnt there)
    wrong = {k: (tuple(v.shape), tuple(target[k].shape)) for k, v in converted.items() if v.shape != target[k].shape}
    assert not wrong
