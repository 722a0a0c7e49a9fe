"""The demo's pretraining steps (`workflows.demo.pretraining`): the shared step-0 weights are written once per seed,
and an `init.pth` the demo did not write (one bearing a pickle, or of another kind) is refused in one line, without
running code from it and without advice to trust it."""
import torch

from pretrain.errors import UserError
from workflows.demo import presets
from workflows.demo.pretraining import step0_encoder


def test_the_step0_weights_are_written_once_and_reused(tmp_path):
    preset = presets.load_preset("smoke")
    path = step0_encoder(preset, tmp_path, 0)
    before = torch.load(path, weights_only=True)["model"]
    assert step0_encoder(preset, tmp_path, 0) == path
    after = torch.load(path, weights_only=True)["model"]
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_planted_init_file_is_one_line_and_runs_nothing(tmp_path, hostile_weights):
    preset = presets.load_preset("smoke")
    evil, marker = hostile_weights(".pth")
    init = tmp_path / "pretrain" / "init.pth"
    init.parent.mkdir(parents=True)
    for content in (evil.read_bytes(), None):
        if content is None:  # a weights file of another kind: a bare tensor
            torch.save(torch.zeros(3), init)
        else:
            init.write_bytes(content)
        try:
            step0_encoder(preset, tmp_path, 0)
        except UserError as e:
            message = str(e)
        else:
            raise AssertionError(f"{init} was taken as the step-0 weights")
        assert "\n" not in message and "--fresh" in message and "--trust-pickle" not in message, message
        assert not marker.exists()
