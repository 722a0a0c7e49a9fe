"""Measuring training cost (`workflows.measure`): the FLOP split between encoder and decoder, interleaved timing, and
the TFLOP/s convention.

Correctness only: no assertion depends on how fast anything ran or how much memory it took.
"""
import pytest
import torch
import torch.nn as nn
from fvcore.nn import FlopCountAnalysis

from workflows.measure import PretrainWorkload, pretrain_flops, time_round_robin, training_tflops


def _workload(model: str, depth: int, ratio: float | None = None, size: int = 32) -> PretrainWorkload:
    return PretrainWorkload("w", model, size, 8, 2, depth, 0.75, ratio)


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


def test_round_robin_interleaves_and_rotates():
    calls = []
    steps = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = time_round_robin(steps, warmup=1, n=3, device=torch.device("cpu"))
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}


def test_training_tflops_convention():
    # 3 x forward, 2 FLOPs per multiply-add: 10 GFLOPs(fma) x 100 img/s -> 6 TFLOP/s
    assert training_tflops(10.0, 100.0) == pytest.approx(6.0)
