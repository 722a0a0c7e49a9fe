"""Reading a LazyConfig safely (`detection.lazyconfig`): an override key that does not exist is an error naming
the closest real key, not a new key detectron2 would create silently."""
from pathlib import Path

from detection import cli as detection_cli

ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "configs/demo/mask_rcnn_vit_smoke_builtin.py")


def test_an_override_key_that_does_not_exist_is_an_error(one_error_line):
    assert detection_cli.train_net(["--config-file", SMOKE, "train.max_itr=5"]) == 2
    one_error_line("train has no key 'max_itr'", "did you mean train.max_iter")
    assert detection_cli.train_net(["--config-file", SMOKE, "model.backbone.net.no_such_arg=1"]) == 2
    one_error_line("no key 'no_such_arg'")
