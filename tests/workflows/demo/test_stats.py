"""The numbers of the demo's report (`workflows.demo.stats`): differences paired by seed, called a result only past
the spread, and values at equal compute."""
import pytest

from detection.report import scored
from workflows.demo.stats import at_compute, paired


def test_a_seed_without_detections_counts_as_zero_ap():
    # (scored itself: tests/detection/test_report.py)
    none = dict.fromkeys(("AP", "AP50", "AP75", "APs", "APm", "APl"))  # detectron2's NaNs, null in ap.json
    empty = scored({"bbox": dict(none), "segm": dict(none), "iteration": 80})
    some = {"bbox": {"AP": 1.5, "AP50": 4.0, "AP75": 0.0, "APs": None}, "segm": {"AP": 0.5, "AP50": 1.0, "AP75": 0.0}}
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
