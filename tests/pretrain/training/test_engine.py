"""One training epoch (`pretrain.training.engine`): gradient accumulation as the official trainers do it, the
partial last group, and the divergence guard's rule."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch._dynamo
import torch._inductor.config as inductor_config

from pretrain.errors import ConfigError
from pretrain.training.config import load_config
from pretrain.training.engine import SpikeGuard, optimizer_steps_per_epoch, train_one_epoch
from pretrain.training import trainer
from pretrain.training.trainer import run


class _Scalar(torch.nn.Module):
    """loss = w * x for a scalar batch x: each iteration's gradient is its own x."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, imgs: torch.Tensor):
        return SimpleNamespace(loss=self.w * imgs.sum())


@pytest.mark.parametrize("step_partial, expected_steps, expected_w", [
    (False, 2, -((1 + 2) / 2 + (3 + 4) / 2)),  # official: iteration 5 (a group of 1) never reaches the weights
    (True, 3, -((1 + 2) / 2 + (3 + 4) / 2 + 5 / 2)),  # stepped on, its loss still divided by accum_iter
])
def test_last_partial_accumulation_group(step_partial, expected_steps, expected_w):
    model = _Scalar()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    steps = []
    optimizer.register_step_post_hook(lambda *_: steps.append(model.w.item()))
    loader = [(torch.tensor([float(x)]), torch.tensor([0])) for x in (1, 2, 3, 4, 5)]
    cfg = {"accum_iter": 2, "warmup_epochs": 0, "epochs": 1, "min_lr": 1.0, "log_every": 1}
    if step_partial:
        cfg["step_partial_accum"] = True
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    stats = train_one_epoch(model, loader, optimizer, scaler, torch.device("cpu"), 0, cfg, peak_lr=1.0)
    assert len(steps) == expected_steps == optimizer_steps_per_epoch(5, 2, step_partial)
    assert model.w.item() == pytest.approx(expected_w)
    assert model.w.grad is None  # nothing left over for the next epoch
    # the dropped group's loss is still logged: w is 0, 0, -1.5, -1.5, -5 when the five losses are computed
    assert stats["loss"] == pytest.approx((0 + 0 - 1.5 * 3 - 1.5 * 4 - 5 * 5) / 5)
    assert optimizer_steps_per_epoch(4, 2, step_partial) == 2


def test_default_is_the_official_accumulation_and_refuses_an_epoch_without_steps(tmp_path, tiny_cfg):
    assert load_config([])["step_partial_accum"] is False
    assert load_config(["--step_partial_accum"])["step_partial_accum"] is True
    with pytest.raises(ConfigError, match="optimizer would never step"):  # 16 images / batch 4 = 4 iterations
        run(tiny_cfg(tmp_path, accum_iter=8, epochs=1))


@pytest.mark.parametrize("model", ["mae_vit_tiny_patch16", "crossmae_vit_tiny_patch16"])
def test_an_epoch_under_the_bf16_policy_forced_on_cpu(tmp_path, monkeypatch, tiny_cfg, model):
    """CUDA's policy (bf16 autocast, `engine.autocast`) through the real trainer, as CPU autocast: the forward runs in
    bf16, the loss and the saved fp32 weights stay finite. A CPU stand-in for the GPU's first run (issue 25)."""
    from pretrain.training import engine, trainer

    monkeypatch.setattr(engine, "autocast", lambda device, cpu_bf16=False: torch.autocast("cpu", dtype=torch.bfloat16))
    dtypes = set()
    real = trainer.create_model

    def recording(cfg):
        m = real(cfg)
        linear = next(mod for mod in m.modules() if isinstance(mod, torch.nn.Linear))
        linear.register_forward_hook(lambda mod, inputs, out: dtypes.add(out.dtype) if mod.training else None)
        return m

    monkeypatch.setattr(trainer, "create_model", recording)
    result = run(tiny_cfg(tmp_path, model=model, epochs=1))
    assert dtypes == {torch.bfloat16}
    assert torch.isfinite(torch.tensor(result["epochs"][0]["loss"]))
    weights = torch.load(tmp_path / "run" / "checkpoint-last.pth", weights_only=True)["model"]
    floats = [v for v in weights.values() if v.is_floating_point()]
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in floats)


def test_the_spike_guard_holds_from_the_second_loss_and_from_a_restored_window():
    fresh = SpikeGuard(10.0)
    # the tests' tiny run at --blr 1e3: its first loss, taken before any update, has nothing to be compared with
    assert fresh(1.28) is None and fresh(1.22) is None
    assert fresh(2.83e4) == "loss 2.83e+04 is over 10 x 1.28, the median of the last 2 losses"
    early = SpikeGuard(10.0)  # while fewer than 20 losses are known, the median counts as at least 1
    assert [early(x) for x in (0.02, 0.5, 0.6, 9.0)] == [None] * 4
    assert early(10.5) == "loss 10.5 is over 10 x 1, the least a median of fewer than 20 losses counts as"
    resumed = SpikeGuard(10.0, recent=[0.4] * 50)  # a late run's losses, as its checkpoint stores them
    assert resumed(4.1) is not None and SpikeGuard(10.0, recent=[0.4] * 50)(3.9) is None
    assert SpikeGuard(0.0)(1.0) is None and SpikeGuard(0.0, recent=[1.0])(1e30) is None  # 0: off


@pytest.mark.slow  # compiling takes tens of seconds on CPU
def test_a_compiled_run_gives_the_losses_of_eager(tmp_path, tiny_cfg):
    """`--compile` changes how the step runs, not what it computes: with inductor drawing from torch's own random
    generator (its default draws other masks), the epoch's loss equals eager's."""
    # torch's own patch: monkeypatch's undo deletes the key from a config module, which hides it from later compiles
    with inductor_config.patch(fallback_random=True):
        eager = run(tiny_cfg(tmp_path / "eager", epochs=1, warmup_epochs=0))
        compiled = run(tiny_cfg(tmp_path / "compiled", epochs=1, warmup_epochs=0, compile=True))
    torch._dynamo.reset()
    assert compiled["epochs"][0]["loss"] == pytest.approx(eager["epochs"][0]["loss"], rel=1e-4)


def test_cpu_bf16_trains_under_bf16_autocast_near_fp32(tmp_path, tiny_cfg, monkeypatch):
    """`--cpu_bf16`: the training forward runs under bf16 autocast on CPU (its matmuls give bf16), and the losses
    stay near fp32's."""
    seen = []
    real = trainer.create_model

    def recording(c):
        model = real(c)
        model.decoder_pred.register_forward_hook(lambda mod, inputs, out: seen.append(out.dtype) if mod.training
                                                 else None)
        return model

    monkeypatch.setattr(trainer, "create_model", recording)
    fp32 = run(tiny_cfg(tmp_path / "fp32", epochs=2))
    assert set(seen) == {torch.float32}
    seen.clear()
    bf16 = run(tiny_cfg(tmp_path / "bf16", epochs=2, cpu_bf16=True))
    assert set(seen) == {torch.bfloat16}
    a, b = ([e["loss"] for e in r["epochs"]] for r in (fp32, bf16))
    assert a != b and np.allclose(a, b, rtol=0.05)
