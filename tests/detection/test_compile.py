"""tools/train_net.py --compile: the backbone's forward through torch.compile changes how the step runs, not what it
computes, nor the checkpoint's keys."""
import json
from pathlib import Path

import pytest
import torch
import torch._dynamo
import torch._inductor.config as inductor_config
from torch._dynamo.utils import counters

import detection  # noqa: F401  (compat layer before detectron2)
from detection.cli import train_net

SMOKE = str(Path(__file__).resolve().parents[2] / "configs/demo/mask_rcnn_vit_smoke_builtin.py")


def _losses(out: Path) -> list[dict[str, float]]:
    records = map(json.loads, (out / "metrics.json").read_text().splitlines())
    return [{k: v for k, v in r.items() if k.startswith("loss_")} for r in records if "total_loss" in r]


@pytest.mark.slow  # inductor compiles the backbone's forward and backward: tens of seconds on CPU
def test_a_compiled_backbone_gives_the_losses_of_eager(tmp_path):
    # inductor draws drop-path's randomness from torch's generator, as eager does (its default draws others)
    # (torch's own patch: monkeypatch's undo deletes the key from a config module, which hides it from later compiles)
    args = ["--config-file", SMOKE, "train.checkpointer.period=100"]
    assert train_net([*args, f"train.output_dir={tmp_path / 'eager'}"]) == 0
    counters.clear()
    try:
        with inductor_config.patch(fallback_random=True):
            assert train_net(["--compile", *args, f"train.output_dir={tmp_path / 'compiled'}"]) == 0
        assert counters["stats"]["unique_graphs"] > 0  # dynamo did compile something
    finally:
        torch._dynamo.reset()
    eager, compiled = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert len(eager) == len(compiled) == 2
    for e, c in zip(eager, compiled):
        assert c == pytest.approx(e, rel=1e-4, abs=1e-5)
    keys = torch.load(tmp_path / "compiled" / "model_final.pth", weights_only=True)["model"].keys()
    assert keys == torch.load(tmp_path / "eager" / "model_final.pth", weights_only=True)["model"].keys()
