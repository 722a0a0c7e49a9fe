"""The benchmark (`workflows.benchmark`): end-to-end outputs, the ViTDet kernels' mode, the memory probe's check, and
its argument errors.

Correctness only: no assertion depends on how fast anything ran or how much memory it took.
"""
import json

import matplotlib.image
import pytest

from workflows import cli
from workflows.benchmark import BenchmarkConfig, run

TINY = dict(size="tiny", input_size=32, patch_size=8, steps=2, warmup=0)


@pytest.mark.slow  # the benchmark end to end
def test_pretrain_end_to_end_writes_table_json_and_plot(tmp_path):
    result = run(BenchmarkConfig(**TINY, sweep=[48], no_memory=True, output=str(tmp_path)))
    variants = ["MAE d=8", "CrossMAE p=0.25 d=12", "CrossMAE p=0.75 d=12"]
    rows = json.loads((tmp_path / "benchmark.json").read_text())
    assert rows == json.loads(json.dumps(result["rows"]))
    assert [(r["input_size"], r["variant"]) for r in rows] == [(s, v) for s in (32, 48) for v in variants]
    assert [r["tokens"] for r in rows] == [16] * 3 + [36] * 3
    for r in rows:
        assert len(r["step_times_s"]) == 2 and r["step_s"] > 0
        assert r["images_per_s"] == pytest.approx(r["batch_size"] / r["step_s"])
        assert r["total_gflops"] == pytest.approx(r["encoder_gflops"] + r["decoder_gflops"])
        assert "mfu" not in r  # CPU: no bf16 peak to compare with
    for size in (32, 48):
        base, *others = [r for r in rows if r["input_size"] == size]
        assert base["decoder_gflops_x_mae"] == 1.0 and base["step_s_x_mae"] == 1.0
        for r in others:
            assert r["decoder_gflops_x_mae"] == pytest.approx(r["decoder_gflops"] / base["decoder_gflops"])
            assert r["images_per_s_x_mae"] == pytest.approx(r["images_per_s"] / base["images_per_s"])

    table = (tmp_path / "benchmark.md").read_text()
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:5] == ["input", "L", "variant", "enc GFLOPs", "dec GFLOPs"]
    assert {"dec xMAE", "step ms", "img/s xMAE", "peak MiB", "step MiB"} <= set(header)
    assert [line.split("|")[3].strip() for line in lines[1:]] == variants * 2
    assert all(len(line.strip("|").split("|")) == len(header) for line in lines)
    assert "MAE d=8 / CrossMAE p=0.25 d=12 at 32px: decoder FLOPs" in table
    image = matplotlib.image.imread(tmp_path / "benchmark.png")
    assert image.ndim == 3 and image.shape[0] > 100


def test_input_size_not_multiple_of_patch_is_refused(tmp_path, capsys):
    assert cli.benchmark(["--size", "tiny", "--input-size", "32", "--patch-size", "8", "--sweep", "36",
                          "--output", str(tmp_path)]) == 2
    assert "not multiples of the patch size 8" in capsys.readouterr().err


@pytest.mark.slow  # the benchmark end to end
def test_vitdet_mode_kernels_agree_and_report_ratio(tmp_path):
    result = run(BenchmarkConfig(vitdet=True, vitdet_size=64, steps=1, warmup=0, no_memory=True,
                                 output=str(tmp_path)))
    assert result["max_abs_output_diff"] < 1e-4  # same weights, same maths
    sdpa, eager, folded = result["rows"]
    assert (sdpa["attn_impl"], eager["attn_impl"], folded["attn_impl"]) == ("sdpa", "eager", "folded")
    assert eager["step_s_x_eager"] == 1.0
    assert sdpa["step_s_x_eager"] == pytest.approx(sdpa["step_s"] / eager["step_s"])
    assert folded["step_s_x_eager"] == pytest.approx(folded["step_s"] / eager["step_s"])
    table = (tmp_path / "vitdet.md").read_text()
    assert "| sdpa | 64 |" in table and "| eager | 64 |" in table and "| folded | 64 |" in table


@pytest.mark.slow  # the benchmark with its memory probe (fresh processes)
def test_memory_columns_come_with_the_probe_check(tmp_path):
    # How much memory a step takes is the benchmark's to report, not a test's to assert; the benchmark checks its
    # own probe against a known allocation and prints the result, which must be there whenever memory is shown
    rows = run(BenchmarkConfig(**{**TINY, "steps": 1}, sweep=[], prediction_ratios=[0.25],
                               output=str(tmp_path)))["rows"]
    assert all(r["peak_mib"] >= r["step_mib"] >= 0 for r in rows)
    header = (tmp_path / "benchmark.md").read_text().split("\n\n| input")[0]
    assert "memory probe check: a 256 MiB allocation in a fresh process reads as" in header
