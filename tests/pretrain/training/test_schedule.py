"""The learning-rate schedule (`pretrain.training.schedule`): linear warm-up, then a half cosine to min_lr."""
import pytest

from pretrain.training.schedule import lr_at


def test_lr_schedule_warmup_then_cosine():
    cfg = {"warmup_epochs": 10, "epochs": 110, "min_lr": 1e-6}
    assert lr_at(0, cfg, 1.0) == 0.0
    assert lr_at(5, cfg, 1.0) == pytest.approx(0.5)
    assert lr_at(10, cfg, 1.0) == pytest.approx(1.0)
    assert lr_at(60, cfg, 1.0) == pytest.approx((1.0 + 1e-6) / 2)
    assert lr_at(110, cfg, 1.0) == pytest.approx(1e-6)
