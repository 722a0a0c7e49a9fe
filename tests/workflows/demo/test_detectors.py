"""The demo's detectors (`workflows.demo.detectors`): the frozen variant, the schedule fitted inside a shortened run,
and the GPU preset's encoder landing in its detector tensor by tensor."""
import pytest
import torch

import detection  # noqa: F401  (compat layer before detectron2)
from detectron2.config import LazyConfig, instantiate
from pretrain.errors import ConfigError
from pretrain.models import create_model
from workflows.demo import detectors, labels, presets, pretraining


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


def test_frozen_variant_fine_tunes_a_frozen_backbone():
    preset = presets.load_preset("smoke")
    cfg = LazyConfig.load(str(presets.DEMO_CONFIGS / preset["detection"]["config"]))
    cfg = LazyConfig.apply_overrides(cfg, detectors.det_overrides(preset, frozen=True))
    model = instantiate(cfg.model).train()
    assert model.backbone.net.freeze and not model.backbone.net.training
    assert not any(p.requires_grad for p in model.backbone.net.parameters())


def test_demo_schedule_steps_the_lr_inside_a_shortened_run():
    # The tiny config places its steps at 533 / 578 of 600 iterations: a 450-iteration run passed only
    # train.max_iter would never decay. schedule_overrides must move both steps (and the warm-up) inside it.
    cfg = LazyConfig.load(str(presets.DEMO_CONFIGS / "mask_rcnn_vit_tiny_builtin.py"))
    cfg = LazyConfig.apply_overrides(cfg, detectors.schedule_overrides(450))
    assert cfg.train.max_iter == 450 and cfg.train.eval_period == 0
    sched = instantiate(cfg.lr_multiplier)  # detectron2's LRMultiplier calls it with iteration / max_iter
    lr = [sched(i / 450) for i in range(450)]
    assert lr[0] < 0.01 and lr[100] == pytest.approx(1.0)
    assert lr[399] == pytest.approx(1.0) and lr[401] == pytest.approx(0.1) and lr[449] == pytest.approx(0.01)
    with pytest.raises(ConfigError, match="too short"):
        detectors.schedule_overrides(13)


@pytest.mark.parametrize("method", labels.METHODS)
def test_gpu_preset_small_encoder_fits_its_detector(method, tmp_path):
    # `--size small` is meant for a CUDA device: a mismatch between its pretraining model and its detection
    # overrides would only show after the GPU pretraining. Build both here, on CPU, through the demo's own
    # config, conversion (which checks the target) and override code, and check every tensor lands.
    preset = presets.load_preset("small")
    cfg = pretraining.pretrain_config(method, preset, tmp_path / "run", seed=0, data_path="unused")
    torch.save({"model": create_model(cfg).state_dict()}, tmp_path / "checkpoint.pth")
    init = detectors.convert(tmp_path / "checkpoint.pth", tmp_path / "d2.pth", preset)
    converted = _weights(init)
    det_cfg = LazyConfig.load(str(presets.DEMO_CONFIGS / preset["detection"]["config"]))
    det_cfg = LazyConfig.apply_overrides(det_cfg, detectors.det_overrides(preset))
    assert det_cfg.train.device == "cuda"
    target = instantiate(det_cfg.model).state_dict()
    net = {k for k in target if k.startswith("backbone.net.") and "rel_pos" not in k}
    assert set(converted) == net  # every encoder tensor, and only those (rel_pos_* is ViTDet's, learnt there)
    wrong = {k: (tuple(v.shape), tuple(target[k].shape)) for k, v in converted.items() if v.shape != target[k].shape}
    assert not wrong
