"""`make demo` in miniature: self-pretrain both methods from one step-0 encoder, evaluate the snapshots, convert,
fine-tune four detectors, write the report; reuse, refusal, the schedule, presets and the report's arithmetic."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from detection.cli import compare_backbones
from pretrain.models import create_model
from pretrain.errors import ConfigError
from detection.report import ap_text, scored
from workflows import cli
from workflows.demo import curves, data, detectors, labels, pipeline, pretraining, presets, scheduler
from workflows.demo.stats import at_compute, paired

DETECTORS = ("vitdet_random", "step0", "mae", "crossmae")


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    pipeline.run(out, "smoke")
    return out


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


def test_repeated_seed_and_unknown_budget_are_one_line_errors(tmp_path, capsys):
    assert cli.demo(["--size", "smoke", "--output", str(tmp_path), "--seeds", "1", "1"]) == 2
    assert cli.demo(["--size", "smoke", "--output", str(tmp_path), "--budget", "huge"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "repeats a seed" in err[0] and "no budget 'huge'" in err[1] and len(err) == 2


def _processes() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, state, command line) of every process, from /proc."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            after_name = (d / "stat").read_text().rsplit(")", 1)[1].split()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # it ended while being read
            continue
        out[int(d.name)] = (int(after_name[1]), after_name[0], cmd)
    return out


def _descendants(pid: int, procs: dict[int, tuple[int, str, str]]) -> set[int]:
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, (ppid, _, _) in procs.items() if ppid in frontier} - found
        found |= frontier
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc (Linux)")
def test_sigterm_stops_the_workers_and_their_train_net(tmp_path):
    # A killed demo once left a detector's train_net running, which later wrote an ap.json without its settings.
    out, log = tmp_path / "out", tmp_path / "labels.log"

    def tail() -> str:
        return log.read_text(errors="replace")[-1500:]

    with open(log, "w") as f:
        demo_proc = subprocess.Popen([sys.executable, str(presets.ROOT / "tools" / "demo.py"), "--size", "smoke",
                                      "--jobs", "2", "--output", str(out)], stdout=f, stderr=subprocess.STDOUT)
    family: dict[int, str] = {}  # the demo's descendants as last seen: pid -> command line

    def look() -> None:
        procs = _processes()
        family.update({p: procs[p][2] for p in _descendants(demo_proc.pid, procs)})

    try:
        deadline = time.time() + 180
        while time.time() < deadline and demo_proc.poll() is None:
            look()
            if any("train_net.py" in cmd for cmd in family.values()):
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"no train_net.py started under the demo's workers; its output:\n{tail()}")
        look()
        demo_proc.send_signal(signal.SIGTERM)
        look()  # anything started as the signal arrived
        assert demo_proc.wait(timeout=60) != 0
        deadline = time.time() + 30
        while time.time() < deadline:
            now = _processes()
            alive = {p for p, cmd in family.items() if p in now and now[p][2] == cmd and now[p][1] != "Z"}
            if not alive:
                break
            time.sleep(0.2)
        assert not alive, f"still running after the demo ended: {[family[p] for p in alive]}; output:\n{tail()}"
        assert not list(out.glob("seed0/detection/*/ap.json"))  # the first detector was stopped, not finished
    finally:  # leave nothing running, whatever failed (only processes whose pid still has the same command line)
        if demo_proc.poll() is None:
            demo_proc.kill()
        now = _processes()
        for pid, cmd in family.items():
            if pid in now and now[pid][2] == cmd:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        demo_proc.wait()


def test_tasks_run_after_what_they_need_and_the_first_failure_stops_the_rest(tmp_path):
    order = []

    def step(name, value):
        order.append(name)
        return value

    tasks = [scheduler.Task("c", lambda r: (step, ("c", r["a"] + r["b"])), after=["a", "b"]),
             scheduler.Task("a", lambda r: (step, ("a", 1))),
             scheduler.Task("b", lambda r: (step, ("b", 2)), finished=None),
             scheduler.Task("d", lambda r: (step, ("d", 0)), finished=7)]  # reused: never run
    results = scheduler.run_tasks(tasks, None, 1, 1, tmp_path, lambda: (0, ""), total=1, desc="")
    assert results == {"a": 1, "b": 2, "c": 3, "d": 7} and order == ["a", "b", "c"]

    def fail():
        raise ConfigError("broken")

    tasks = [scheduler.Task("x", lambda r: (fail, ())), scheduler.Task("y", lambda r: (step, ("y", 0)), after=["x"])]
    with pytest.raises(ConfigError, match="broken"):
        scheduler.run_tasks(tasks, None, 1, 1, tmp_path, lambda: (0, ""), total=1, desc="")
    assert "y" not in order
    with pytest.raises(ConfigError, match="--jobs 0"):
        scheduler.plan_jobs(0)
    assert scheduler.plan_jobs(1) == (1, torch.get_num_threads())
    assert ap_text(None) == "0 (no detections)" and ap_text(3.14) == "3.1"  # pycocotools' None: no crash


def test_budget_merges_over_the_preset():
    base, long = presets.load_preset("tiny"), presets.load_preset("tiny", "long")
    assert long["pretrain"]["epochs"] > base["pretrain"]["epochs"] and long["detection"]["frozen"]
    assert long["pretrain"]["batch_size"] == base["pretrain"]["batch_size"]  # untouched keys stay
    assert (base["budget"], long["budget"]) == ("default", "long")


def test_set_changes_preset_settings_and_refuses_unknown_keys():
    base = presets.load_preset("tiny")
    cfg = presets.apply_settings(base, ["pretrain.blr=8e-3", "crossmae_prediction_ratio=0.75", "pretrain.min_lr=1e-6",
                                     "probe.pool=mean"])
    assert cfg["pretrain"]["blr"] == 0.008 and isinstance(cfg["pretrain"]["blr"], float)  # 8e-3 is a str to YAML
    assert cfg["crossmae_prediction_ratio"] == 0.75 and cfg["pretrain"]["min_lr"] == 1e-6  # a trainer key
    assert cfg["probe"]["pool"] == "mean" and cfg["set"][0] == "pretrain.blr=8e-3"
    assert base["pretrain"]["blr"] == 4e-3 and "set" not in base  # the preset itself is untouched
    assert pretraining.pretrain_config("crossmae", cfg, Path("x"), 0, "x")["prediction_ratio"] == 0.75
    for bad, words in (("pretrain.blr", "KEY=VALUE"), ("pretrain.bogus=1", "no setting pretrain.bogus"),
                       ("detection.iters.x=1", "not a section"), ("probe.min_lr=0", "no setting probe.min_lr"),
                       ("pretrain.seed=3", "use --seeds"), ("budget=long", "use --budget"),
                       ("probe.k=abc", "is int"), ("detection=1", "is dict"), ("pretrain.blr=nan", "not a finite"),
                       ("pretrain.epochs=2.5", "is int"), ("probe.k=[", "not a YAML value")):
        with pytest.raises(ConfigError, match=words):
            presets.apply_settings(base, [bad])
    assert presets.apply_settings(base, ["pretrain.min_lr=0"])["pretrain"]["min_lr"] == 0  # an int for a float


def test_set_items_of_repeated_flags_all_count(tmp_path, capsys):
    assert cli.demo(["--size", "smoke", "--output", str(tmp_path), "--set", "bogus.x=1", "--set", "probe.k=2"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "bogus" in err[0] and len(err) == 1  # the first --set was kept, not replaced by the second


def test_frozen_variant_fine_tunes_a_frozen_backbone():
    from detectron2.config import LazyConfig, instantiate

    preset = presets.load_preset("smoke")
    cfg = LazyConfig.load(str(presets.DEMO_CONFIGS / preset["detection"]["config"]))
    cfg = LazyConfig.apply_overrides(cfg, detectors.det_overrides(preset, frozen=True))
    model = instantiate(cfg.model).train()
    assert model.backbone.net.freeze and not model.backbone.net.training
    assert not any(p.requires_grad for p in model.backbone.net.parameters())


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


def test_compare_backbones_scores_a_run_without_detections_as_zero(tmp_path, capsys):
    # the demo report's rule (scored) in the comparison tool too: 0 AP and a line naming it, not n/a
    runs = {"base": {"bbox": {"AP": 1.5, "AP50": 4.0, "AP75": 0.5}, "segm": {"AP": 1.0, "AP50": 3.0, "AP75": 0.0}},
            "null": {"bbox": dict.fromkeys(("AP", "AP50", "AP75")), "segm": {"AP": 0.4, "AP50": 1.0, "AP75": 0.0}}}
    for name, ap in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "ap.json").write_text(json.dumps(ap))
    (tmp_path / "nan").mkdir()  # NaN as another tool writes it, not null
    (tmp_path / "nan" / "ap.json").write_text('{"bbox": {"AP": NaN, "AP50": NaN, "AP75": NaN}, "segm": {}}')
    assert compare_backbones([str(tmp_path / n) for n in ("base", "null", "nan")]) == 0
    out = capsys.readouterr().out
    assert "| null | 0.0 (-1.5) | 0.0 (-4.0) | 0.0 (-0.5) | 0.4 (-0.6) |" in out
    assert "| nan | 0.0 (-1.5) |" in out and "n/a" in out.split("| nan |")[1]  # segm missing: still n/a
    assert out.strip().endswith("No detections at all, scored 0 AP: null (bbox), nan (bbox)")


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


def test_a_detector_without_detections_scores_zero_not_missing():
    none = dict.fromkeys(("AP", "AP50", "AP75", "APs", "APm", "APl"))  # detectron2's NaNs, null in ap.json
    empty = scored({"bbox": dict(none), "segm": dict(none), "iteration": 80})
    assert empty["bbox"]["AP"] == 0.0 and empty["segm"]["AP75"] == 0.0 and empty["bbox"]["no_detections"]
    assert empty["bbox"]["APs"] is None  # size buckets stay undefined
    some = {"bbox": {"AP": 1.5, "AP50": 4.0, "AP75": 0.0, "APs": None}, "segm": {"AP": 0.5, "AP50": 1.0, "AP75": 0.0}}
    assert scored(some) == some
    d = paired([scored(some)["bbox"]["AP"], empty["bbox"]["AP"]], [1.0, 0.5])
    assert d["per_seed"] == [0.5, -0.5]  # the empty seed counts, as 0 AP


def test_paired_differences_and_equal_compute_interpolation():
    d = paired([3.0, 4.0, 5.0], [1.0, 1.5, 2.5])
    assert d["mean"] == pytest.approx(7 / 3) and d["per_seed"] == [2.0, 2.5, 2.5] and d["result"]
    noisy = paired([1.0, -1.0, 2.0], [0.0, 0.0, 0.0])  # signs disagree: inside the spread
    assert not noisy["result"] and noisy["min"] == -1.0
    assert not paired([1.0], [0.0])["result"]  # one seed has no spread to exceed
    points = [{"pretrain_tflops": 0.0, "knn": 0.4}, {"pretrain_tflops": 2.0, "knn": 0.6},
              {"pretrain_tflops": 4.0, "knn": 0.7}]
    assert at_compute(points, 3.0, "knn") == pytest.approx(0.65) and at_compute(points, 0.0, "knn") == 0.4


def test_demo_schedule_steps_the_lr_inside_a_shortened_run():
    # The tiny config places its steps at 533 / 578 of 600 iterations: a 450-iteration run passed only
    # train.max_iter would never decay. schedule_overrides must move both steps (and the warm-up) inside it.
    from detectron2.config import LazyConfig, instantiate

    cfg = LazyConfig.load(str(presets.DEMO_CONFIGS / "mask_rcnn_vit_tiny_builtin.py"))
    cfg = LazyConfig.apply_overrides(cfg, detectors.schedule_overrides(450))
    assert cfg.train.max_iter == 450 and cfg.train.eval_period == 0
    sched = instantiate(cfg.lr_multiplier)  # detectron2's LRMultiplier calls it with iteration / max_iter
    lr = [sched(i / 450) for i in range(450)]
    assert lr[0] < 0.01 and lr[100] == pytest.approx(1.0)
    assert lr[399] == pytest.approx(1.0) and lr[401] == pytest.approx(0.1) and lr[449] == pytest.approx(0.01)
    with pytest.raises(ConfigError, match="too short"):
        detectors.schedule_overrides(13)


@pytest.mark.parametrize("method", labels.METHODS)
def test_gpu_preset_small_encoder_fits_its_detector(method, tmp_path):
    # `--size small` is meant for a CUDA device: a mismatch between its pretraining model and its detection
    # overrides would only show after the GPU pretraining. Build both here, on CPU, through the demo's own
    # config, conversion (which checks the target) and override code, and check every tensor lands.
    from detectron2.config import LazyConfig, instantiate

    preset = presets.load_preset("small")
    cfg = pretraining.pretrain_config(method, preset, tmp_path / "run", seed=0, data_path="unused")
    torch.save({"model": create_model(cfg).state_dict()}, tmp_path / "checkpoint.pth")
    init = detectors.convert(tmp_path / "checkpoint.pth", tmp_path / "d2.pth", preset)
    converted = _weights(init)
    det_cfg = LazyConfig.load(str(presets.DEMO_CONFIGS / preset["detection"]["config"]))
    det_cfg = LazyConfig.apply_overrides(det_cfg, detectors.det_overrides(preset))
    assert det_cfg.train.device == "cuda"
    target = instantiate(det_cfg.model).state_dict()
    net = {k for k in target if k.startswith("backbone.net.") and "rel_pos" not in k}
    assert set(converted) == net  # every encoder tensor, and only those (rel_pos_* is ViTDet's, learnt there)
    wrong = {k: (tuple(v.shape), tuple(target[k].shape)) for k, v in converted.items() if v.shape != target[k].shape}
    assert not wrong


def test_curve_points_are_evaluated_again_under_other_probe_settings(report_dir):
    # curve.json caches each snapshot's probe scores; a --set probe.* must not reuse scores of other settings
    preset = presets.load_preset("smoke")
    info = json.loads((report_dir / "seed0" / "pretrain" / "mae" / "summary.json").read_text())
    sets = data.detection_sets(preset)
    probes, val = data.probe_sets(sets, preset["pretrain"]["input_size"]), data.images_of(*sets["val"])
    gflops = pretraining.forward_gflops("mae", preset)
    before = curves.curve("mae", info, probes, val, preset, gflops)
    assert all(p["probe"] == preset["probe"] for p in before)
    other = presets.apply_settings(preset, ["probe.k=1", "probe.pool=mean"])
    after = curves.curve("mae", info, probes, val, other, gflops)
    assert [p["step"] for p in after] == [p["step"] for p in before]
    assert all(p["probe"]["k"] == 1 and p["probe"]["pool"] == "mean" for p in after)
    stored = json.loads((report_dir / "seed0" / "pretrain" / "mae" / "curve.json").read_text())
    assert [p["probe"] for p in stored] == [p["probe"] for p in after]
    again = curves.curve("mae", info, probes, val, preset, gflops)  # back to the preset's: evaluated afresh
    assert [p["knn"] for p in again] == pytest.approx([p["knn"] for p in before])
