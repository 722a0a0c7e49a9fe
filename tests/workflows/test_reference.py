"""`tools/benchmark.py --reference`: the official models are built with the paper's settings and stepped next to
ours; ratios are official / ours. The official code is not in this repository, so a stand-in checkout (written here,
with the official constructor names and forward signatures) records what it was asked to build and run."""
import json

import pytest

from pretrain.errors import ConfigError
from workflows.benchmark import BenchmarkConfig, run

STAND_IN = '''
import json
import torch
from pretrain.models import create_model


def record(*call):
    with open(__file__ + ".calls", "a") as f:
        f.write(json.dumps(call) + "\\n")


class Official(torch.nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.inner = create_model(cfg)

    def forward(self, imgs, mask_ratio=0.75, {extra}):
        record("forward", mask_ratio, {extra_name})
        return self.inner(imgs).loss, None, None


def mae_vit_small_patch16_dec512d8b(**kwargs):
    record("build", kwargs)
    return Official({{"model": "{model}", "model_kwargs": {{"patch_size": 8}}, "input_size": 32,
                     "norm_pix_loss": True, "mask_ratio": 0.75, "decoder_depth": kwargs.get("decoder_depth", 8), "prediction_ratio": {ratio}}})
'''


def _checkout(root):
    root.mkdir()
    (root / "models_mae.py").write_text(STAND_IN.format(extra="unused=None", extra_name="None",
                                                        model="mae_vit_small_patch16", ratio="None"))
    (root / "models_cross.py").write_text(STAND_IN.format(extra="kept_mask_ratio=0.75", extra_name="kept_mask_ratio",
                                                          model="crossmae_vit_small_patch16", ratio=0.25))
    return root


def _calls(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_reference_builds_the_papers_settings_and_reports_official_over_ours(tmp_path):
    checkout = _checkout(tmp_path / "official")
    result = run(BenchmarkConfig(size="small", input_size=32, patch_size=8, batch_size=2, steps=2, warmup=0,
                                 prediction_ratios=[0.25], no_memory=True, reference=str(checkout), cpu_bf16=True,
                                 output=str(tmp_path / "out")))
    rows = result["rows"]
    assert [(r["variant"], r["code"]) for r in rows] == [(v, code) for v in ("MAE d=8", "CrossMAE p=0.25 d=12")
                                                         for code in ("official", "ours", "ours bf16")]
    for r in rows:
        official = next(o for o in rows if o["variant"] == r["variant"] and o["code"] == "official")
        assert r["x_reference"] == pytest.approx(official["step_s"] / r["step_s"])
        assert len(r["step_times_s"]) == 2
    # CrossMAE as the paper's recipe runs it; MAE as MAE's; each official model stepped 2 times
    cross, mae = _calls(checkout / "models_cross.py.calls"), _calls(checkout / "models_mae.py.calls")
    assert cross[0] == ["build", {"norm_pix_loss": True, "weight_fm": True, "use_input": True, "use_fm": [-1],
                                  "decoder_depth": 12}]
    assert cross[1:] == [["forward", 0.75, 0.25]] * 2
    assert mae == [["build", {"norm_pix_loss": True}], ["forward", 0.75, None], ["forward", 0.75, None]]
    assert json.loads((tmp_path / "out" / "reference.json").read_text()) == json.loads(json.dumps(rows))
    assert "| CrossMAE p=0.25 d=12 | official |" in (tmp_path / "out" / "reference.md").read_text()


def test_reference_without_the_official_files_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="has no models_mae.py; give a checkout of"):
        run(BenchmarkConfig(size="small", input_size=32, patch_size=8, reference=str(tmp_path), no_memory=True,
                            output=str(tmp_path / "out")))
    (tmp_path / "models_mae.py").write_text("import no_such_module\n")
    (tmp_path / "models_cross.py").write_text("")
    with pytest.raises(ConfigError, match=r"models_mae.py does not import here \(ModuleNotFoundError"):
        run(BenchmarkConfig(size="small", input_size=32, patch_size=8, reference=str(tmp_path), no_memory=True,
                            output=str(tmp_path / "out")))
