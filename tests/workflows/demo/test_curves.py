"""Transfer against compute (`workflows.demo.curves`): a snapshot's probe scores are cached with the probe settings
they were measured under, and measured again under others."""
import json

import pytest

from workflows.demo import curves, data, presets, pretraining

pytestmark = pytest.mark.slow  # reads the smoke demo's output (report_dir)


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
