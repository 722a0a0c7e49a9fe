"""Comparing detection runs (`detection.report`, `detection.cli.compare_backbones`): the AP table with its spread,
the plot, runs without detections scored 0 AP, no file replaced without --overwrite, the predictions shown per
image."""
import json

import numpy as np
import pytest
from PIL import Image

from detection.cli import compare_backbones
from detection.report import ap_table, ap_text, mean_std, plot_predictions, scored, top_detections


@pytest.mark.slow  # reads the smoke demo's output (report_dir)
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


def test_compare_backbones_replaces_no_file_without_overwrite_and_never_an_ap_json(tmp_path, one_error_line):
    ap = '{"bbox": {"AP": 1.5, "AP50": 4.0, "AP75": 0.5}, "segm": {}}'
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "ap.json").write_text(ap)
    runs = [str(tmp_path / "a"), str(tmp_path / "b")]
    (tmp_path / "notes.md").write_text("mine")
    assert compare_backbones([*runs, "--markdown", str(tmp_path / "notes.md")]) == 2
    one_error_line("notes.md exists; pass --overwrite")
    assert compare_backbones([*runs, "--plot", str(tmp_path / "a" / "ap.json"), "--overwrite"]) == 2
    one_error_line("is also an input")
    assert compare_backbones([*runs, "--plot", str(tmp_path / "notes.md"), "--markdown", str(tmp_path / "notes.md"),
                              "--overwrite"]) == 2
    one_error_line("--plot and --markdown name one file")
    assert (tmp_path / "notes.md").read_text() == "mine" and (tmp_path / "a" / "ap.json").read_text() == ap
    assert compare_backbones([*runs, "--markdown", str(tmp_path / "notes.md"), "--overwrite"]) == 0
    assert (tmp_path / "notes.md").read_text().startswith("|")


def test_top_detections_ranks_filters_and_cuts_per_image():
    res = [{"image_id": 1, "score": 0.2}, {"image_id": 1, "score": 0.9}, {"image_id": 2, "score": 0.95},
           {"image_id": 1, "score": 0.04}, {"image_id": 1, "score": 0.5}]
    assert [d["score"] for d in top_detections(res, 1, 2)] == [0.9, 0.5]
    assert [d["score"] for d in top_detections(res, 1, 10)] == [0.9, 0.5, 0.2]  # 0.04 is under min_score
    assert top_detections(res, 3, 5) == []


def test_mean_std_and_table_spread():
    runs = [{"bbox": {"AP": 2.0, "AP50": 5.0, "AP75": None}, "segm": {"AP": 1.0, "AP50": 3.0, "AP75": 0.0}},
            {"bbox": {"AP": 4.0, "AP50": 7.0, "AP75": 1.0}, "segm": {"AP": 3.0, "AP50": 5.0, "AP75": 0.0}}]
    mean, std = mean_std(runs)
    assert mean["bbox"]["AP"] == 3.0 and abs(std["bbox"]["AP"] - 2 ** 0.5) < 1e-9
    assert "AP75" not in mean["bbox"]  # missing in one run: left out, shown as n/a
    table = ap_table(["a", "b"], [mean, {"bbox": {"AP": 1.0}, "segm": {}}], [std, {}])
    assert "| a | 3.0 ± 1.4 | 6.0 ± 1.4 | n/a | 2.0 ± 1.4 |" in table
    assert "| b | 1.0 (-2.0) | n/a" in table


def test_a_detector_without_detections_scores_zero_not_missing():
    # (how such a seed enters the demo's paired differences: tests/workflows/demo/test_stats.py)
    none = dict.fromkeys(("AP", "AP50", "AP75", "APs", "APm", "APl"))  # detectron2's NaNs, null in ap.json
    empty = scored({"bbox": dict(none), "segm": dict(none), "iteration": 80})
    assert empty["bbox"]["AP"] == 0.0 and empty["segm"]["AP75"] == 0.0 and empty["bbox"]["no_detections"]
    assert empty["bbox"]["APs"] is None  # size buckets stay undefined
    some = {"bbox": {"AP": 1.5, "AP50": 4.0, "AP75": 0.0, "APs": None}, "segm": {"AP": 0.5, "AP50": 1.0, "AP75": 0.0}}
    assert scored(some) == some


def test_ap_text_says_no_detections_for_pycocotools_none():
    assert ap_text(None) == "0 (no detections)" and ap_text(3.14) == "3.1"  # pycocotools' None: no crash


def test_predictions_are_drawn_on_a_16_bit_image_as_the_detector_reads_it(tmp_path):
    """A dark 16-bit grey image (a quarter of full scale: grey 64 in 8 bits) is drawn dark, not clipped to white."""
    Image.fromarray(np.full((64, 64), 16384, np.uint16)).save(tmp_path / "deep.png")
    square = [8, 8, 24, 8, 24, 24, 8, 24]
    gt = {"images": [{"id": 1, "file_name": "deep.png", "height": 64, "width": 64}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [8, 8, 16, 16], "area": 256.0,
                           "segmentation": [square], "iscrowd": 0}],
          "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "run" / "inference").mkdir(parents=True)
    (tmp_path / "run" / "inference" / "coco_instances_results.json").write_text("[]")
    path = plot_predictions(tmp_path / "gt.json", tmp_path, {"run": tmp_path / "run"}, tmp_path / "p.png")
    grey = np.asarray(Image.open(path).convert("L"), dtype=float)
    dark = (grey < 100).mean()  # the two image panels; the rest of the figure is white
    assert dark > 0.25, dark
