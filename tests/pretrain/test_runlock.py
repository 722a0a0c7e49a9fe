"""One run per folder (`pretrain.runlock`): a second holder is refused with the first one's PID, in another process
or this one; the lock ends with its block and with its process, so a lock file left by a killed run blocks nothing."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.errors import ConfigError
from pretrain.runlock import LOCK_FILE, FolderInUse, run_lock

ROOT = Path(__file__).resolve().parents[2]
HOLD = ("import sys; from pretrain.runlock import run_lock\n"
        "with run_lock(sys.argv[1]):\n"
        "    print('held', flush=True); sys.stdin.read()\n")


def _holder(folder: Path) -> subprocess.Popen:
    """A process that holds the lock on `folder` until its stdin closes."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def test_a_second_process_is_refused_with_the_holders_pid(tmp_path):
    holder = _holder(tmp_path / "run")
    try:
        with pytest.raises(FolderInUse) as e:
            with run_lock(tmp_path / "run", "--output_dir"):
                pass
        assert f"PID {holder.pid}" in str(e.value) and "--output_dir" in str(e.value) and "\n" not in str(e.value)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    with run_lock(tmp_path / "run"):  # released when the holder ended
        assert (tmp_path / "run" / LOCK_FILE).read_text().strip() == str(os.getpid())


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path):
    holder = _holder(tmp_path / "run")
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert (tmp_path / "run" / LOCK_FILE).read_text().strip() == str(holder.pid)  # left behind, as after a kill
    with run_lock(tmp_path / "run"):
        assert (tmp_path / "run" / LOCK_FILE).read_text().strip() == str(os.getpid())


def test_the_same_process_cannot_hold_a_folder_twice_and_the_block_releases_it(tmp_path):
    with pytest.raises(RuntimeError, match="inside"):
        with run_lock(tmp_path):
            with pytest.raises(FolderInUse, match=f"PID {os.getpid()}"):
                with run_lock(tmp_path):
                    pass
            raise RuntimeError("inside")
    assert (tmp_path / LOCK_FILE).read_text() == ""  # no PID of a process that holds nothing
    with run_lock(tmp_path):  # released by the exception that left the block
        pass


def test_a_disabled_lock_takes_nothing(tmp_path):
    with run_lock(tmp_path):
        with run_lock(tmp_path, enabled=False):  # what torchrun's other ranks do
            pass


@pytest.mark.parametrize("case, needle", [("file", "is a file; give a folder"),
                                          ("under a file", "cannot be written (Not a directory)")])
def test_a_folder_that_cannot_be_made_is_one_line(case, needle, tmp_path):
    (tmp_path / "f").write_text("x")
    target = tmp_path / "f" if case == "file" else tmp_path / "f" / "run"
    with pytest.raises(ConfigError, match="--output_dir") as e:
        with run_lock(target, "--output_dir"):
            pass
    assert needle in str(e.value) and "\n" not in str(e.value)
