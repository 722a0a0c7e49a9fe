"""Our MAE / CrossMAE training step against the official code's, side by side in one process (`tools/benchmark.py
--reference DIR`).

DIR is a checkout of the official CrossMAE repository (github.com/TonyLianLong/CrossMAE), which also carries MAE's
`models_mae.py`; nothing of it is copied into this project. Its models are built as its `main_pretrain.py` builds
them for the paper's ViT-B recipe (CrossMAE: `weight_fm`, `use_input`, every feature map, decoder depth 12,
`kept_mask_ratio` = the prediction ratio; MAE: decoder depth 8, `norm_pix_loss`) and stepped with the same AdamW
as ours, interleaved step by step with ours (eager, and compiled with `--compile`).
"""
from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from pretrain.errors import ConfigError

from .measure import PretrainWorkload, TrainStep, median, time_round_robin

# the official constructors of each size (MAE's names, used by both repositories)
_CONSTRUCTORS = {"small": "mae_vit_small_patch16_dec512d8b", "base": "mae_vit_base_patch16_dec512d8b",
                 "large": "mae_vit_large_patch16_dec512d8b", "huge": "mae_vit_huge_patch14_dec512d8b"}


def load_reference(root: str | Path, module: str) -> ModuleType:
    """`module` (models_cross or models_mae) of the official checkout at `root`, imported with `root` on sys.path.

    Raises:
        ConfigError: `root` holds no such file, or it does not import here.
    """
    root = Path(root)
    if not (root / f"{module}.py").is_file():
        raise ConfigError(f"--reference {root} has no {module}.py; give a checkout of "
                          "https://github.com/TonyLianLong/CrossMAE")
    spec = importlib.util.spec_from_file_location(f"official_{module}", root / f"{module}.py")
    loaded = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(root))  # for its own imports (transformer_utils, util.pos_embed)
    try:
        spec.loader.exec_module(loaded)
    except Exception as e:  # noqa: BLE001 - their code, on this stack
        raise ConfigError(f"--reference {root}: {module}.py does not import here ({type(e).__name__}: {e})") from None
    finally:
        sys.path.remove(str(root))
    return loaded


@dataclass(frozen=True)
class ReferenceWorkload(PretrainWorkload):
    """`PretrainWorkload` whose model is the official one (`module`'s constructor for `size`)."""

    module: ModuleType | None = None
    size: str = "base"

    def build(self) -> nn.Module:
        ctor = getattr(self.module, _CONSTRUCTORS[self.size])
        if self.prediction_ratio is None:
            return ctor(norm_pix_loss=True)
        return ctor(norm_pix_loss=True, weight_fm=True, use_input=True, use_fm=[-1], decoder_depth=self.decoder_depth)

    def loss(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        kept = {} if self.prediction_ratio is None else {"kept_mask_ratio": self.prediction_ratio}
        out = model(x, mask_ratio=self.mask_ratio, **kept)
        return out[0] if isinstance(out, tuple) else out  # MAE's release returns (loss, pred, mask), CrossMAE's loss


def measure_reference(root: str | Path, size: str, ours: list[PretrainWorkload], device: torch.device, warmup: int,
                      steps: int, compile: bool, fused: bool, cpu_bf16: bool = False) -> list[dict[str, Any]]:
    """Median step of each of `ours` (MAE rows and CrossMAE rows) and of the official model of the same settings
    (as released: fp32 on CPU), interleaved; with `compile` also ours compiled, with `cpu_bf16` also ours under bf16
    autocast on CPU. Rows: {"variant", "code", "step_s", "x_reference"}."""
    if size not in _CONSTRUCTORS:
        raise ConfigError(f"--reference has no official model of size {size}; pick one of {', '.join(_CONSTRUCTORS)}")
    modules = {"mae": load_reference(root, "models_mae"), "crossmae": load_reference(root, "models_cross")}
    runs: dict[str, TrainStep] = {}
    for w in ours:
        method = "crossmae" if w.prediction_ratio is not None else "mae"
        ref = ReferenceWorkload(**{**w.__dict__, "module": modules[method], "size": size})
        runs[f"{w.label}|official"] = TrainStep(ref, device, False, fused)
        runs[f"{w.label}|ours"] = TrainStep(w, device, False, fused)
        if compile:
            runs[f"{w.label}|ours compiled"] = TrainStep(w, device, True, fused)
        if cpu_bf16 and device.type == "cpu":
            runs[f"{w.label}|ours bf16"] = TrainStep(w, device, False, fused, cpu_bf16=True)
    times = time_round_robin(runs, warmup, steps, device)
    rows = []
    for key, values in times.items():
        variant, code = key.split("|")
        rows.append({"variant": variant, "code": code, "step_s": median(values), "step_times_s": values})
    for row in rows:
        ref = next(r for r in rows if r["variant"] == row["variant"] and r["code"] == "official")
        row["x_reference"] = ref["step_s"] / row["step_s"]
    return rows


def reference_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| variant | code | median step ms | speed x official |", "|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['code']} | {r['step_s'] * 1000:.0f} | {r['x_reference']:.3f} |" for r in rows]
    return "\n".join(lines)
