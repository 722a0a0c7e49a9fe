"""The benchmark (workflows.benchmark, workflows.measure): end-to-end outputs, FLOP split, interleaving, memory probe.

Correctness only: no assertion depends on how fast anything ran or how much memory it took.
"""
import json

import matplotlib.image
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from fvcore.nn import FlopCountAnalysis

from pretrain.evaluation.flops import sdpa_flop_handle
from workflows import cli
from workflows.benchmark import BenchmarkConfig, run
from workflows.measure import PretrainWorkload, peak_memory, pretrain_flops, time_round_robin, training_tflops

TINY = dict(size="tiny", input_size=32, patch_size=8, steps=2, warmup=0)


def _workload(model: str, depth: int, ratio: float | None = None, size: int = 32) -> PretrainWorkload:
    return PretrainWorkload("w", model, size, 8, 2, depth, 0.75, ratio)


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


def test_vitdet_mode_kernels_agree_and_report_ratio(tmp_path):
    result = run(BenchmarkConfig(vitdet=True, vitdet_size=64, steps=1, warmup=0, no_memory=True,
                                 output=str(tmp_path)))
    assert result["max_abs_output_diff"] < 1e-4  # same weights, same maths
    sdpa, eager = result["rows"]
    assert (sdpa["attn_impl"], eager["attn_impl"]) == ("sdpa", "eager")
    assert eager["step_s_x_eager"] == 1.0
    assert sdpa["step_s_x_eager"] == pytest.approx(sdpa["step_s"] / eager["step_s"])
    table = (tmp_path / "vitdet.md").read_text()
    assert "| sdpa | 64 |" in table and "| eager | 64 |" in table


def test_flop_split_follows_the_decoders():
    cross_25 = pretrain_flops(_workload("crossmae_vit_tiny_patch16", 12, 0.25))
    cross_75 = pretrain_flops(_workload("crossmae_vit_tiny_patch16", 12, 0.75))
    assert cross_25["decoder"] < cross_75["decoder"]
    assert cross_25["encoder"] == cross_75["encoder"]

    mae = [pretrain_flops(_workload("mae_vit_tiny_patch16", d)) for d in (2, 4, 8)]
    assert mae[0]["decoder"] < mae[1]["decoder"] < mae[2]["decoder"]
    # two more identical blocks add the same amount again
    assert mae[2]["decoder"] - mae[1]["decoder"] == pytest.approx(2 * (mae[1]["decoder"] - mae[0]["decoder"]))

    # the encoders differ only by MAE's final LayerNorm over cls + 4 visible tokens of width 192
    norm = FlopCountAnalysis(nn.LayerNorm(192), torch.zeros(1, 5, 192)).total() / 1e9
    assert norm > 0
    assert mae[0]["encoder"] - cross_25["encoder"] == pytest.approx(norm, rel=1e-9)


def test_sdpa_flop_handle_counts_two_batched_matmuls_exactly():
    class Attend(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 4)
    analysis = FlopCountAnalysis(Attend(), (q, k, v))
    analysis.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_handle)
    # q k^T: 2*3 heads x 5 x 7 x 8 multiply-adds; attn v: 2*3 x 5 x 7 x 4
    assert analysis.total() == 2 * 3 * 5 * 7 * 8 + 2 * 3 * 5 * 7 * 4


def test_round_robin_interleaves_and_rotates():
    calls = []
    steps = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = time_round_robin(steps, warmup=1, n=3, device=torch.device("cpu"))
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}


def test_memory_columns_come_with_the_probe_check(tmp_path):
    # How much memory a step takes is the benchmark's to report, not a test's to assert; the benchmark checks its
    # own probe against a known allocation and prints the result, which must be there whenever memory is shown
    rows = run(BenchmarkConfig(**{**TINY, "steps": 1}, sweep=[], prediction_ratios=[0.25],
                               output=str(tmp_path)))["rows"]
    assert all(r["peak_mib"] >= r["step_mib"] >= 0 for r in rows)
    header = (tmp_path / "benchmark.md").read_text().split("\n\n| input")[0]
    assert "memory probe check: a 256 MiB allocation in a fresh process reads as" in header


def test_training_tflops_convention():
    # 3 x forward, 2 FLOPs per multiply-add: 10 GFLOPs(fma) x 100 img/s -> 6 TFLOP/s
    assert training_tflops(10.0, 100.0) == pytest.approx(6.0)
