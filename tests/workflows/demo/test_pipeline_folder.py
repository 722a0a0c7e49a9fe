"""The demo's output folder (`workflows.demo.pipeline`): one demo per folder, refused in one line naming the PID of
the demo that holds it, and `--fresh` clears the folder without letting go of it. Fast: the demo's work is replaced by
a stand-in that stops it where the real work would begin."""
import os

import pytest

from pretrain.errors import ConfigError
from pretrain.runlock import FolderInUse, run_lock
from workflows import cli
from workflows.demo import pipeline


def _stop_at_the_work(monkeypatch, then=lambda: None):
    """Make the demo stop, with a one-line error, where its work would begin (after `then()`)."""
    def stop(cfg):
        then()
        raise ConfigError("stand-in: the demo's work would begin here")
    monkeypatch.setattr(pipeline, "detection_sets", stop)


def test_a_second_demo_into_a_folder_in_use_is_refused_and_fresh_deletes_nothing(tmp_path, monkeypatch,
                                                                                 one_error_line):
    _stop_at_the_work(monkeypatch)
    out = tmp_path / "demo"
    out.mkdir()
    (out / "report.md").write_text("the first demo's")
    with run_lock(out):  # as the first demo holds it
        assert cli.demo(["--size", "smoke", "--output", str(out), "--fresh"]) == 2
    one_error_line("--output", "in use by another run", f"PID {os.getpid()}")
    assert (out / "report.md").read_text() == "the first demo's"


def test_fresh_clears_the_folder_and_keeps_holding_it(tmp_path, monkeypatch, one_error_line):
    out = tmp_path / "demo"
    (out / "seed0").mkdir(parents=True)
    (out / "report.md").write_text("old")

    def second_demo():
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # cleared, but for the lock
        with pytest.raises(FolderInUse):
            with run_lock(out):
                pass

    _stop_at_the_work(monkeypatch, second_demo)
    assert cli.demo(["--size", "smoke", "--output", str(out), "--fresh"]) == 2
    one_error_line("stand-in")
