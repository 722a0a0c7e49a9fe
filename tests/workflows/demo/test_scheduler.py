"""The demo's scheduler (`workflows.demo.scheduler`): dependent tasks in order, the first failure stops the rest, and
a SIGTERM stops the workers and the detector runs they started."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pretrain.errors import ConfigError
from workflows.demo import presets, scheduler


def _processes() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, state, command line) of every process, from /proc."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            after_name = (d / "stat").read_text().rsplit(")", 1)[1].split()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # it ended while being read
            continue
        out[int(d.name)] = (int(after_name[1]), after_name[0], cmd)
    return out


def _descendants(pid: int, procs: dict[int, tuple[int, str, str]]) -> set[int]:
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, (ppid, _, _) in procs.items() if ppid in frontier} - found
        found |= frontier
    return found


@pytest.mark.slow  # the smoke demo in a subprocess, until a detector trains
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc (Linux)")
def test_sigterm_stops_the_workers_and_their_train_net(tmp_path):
    # A killed demo once left a detector's train_net running, which later wrote an ap.json without its settings.
    out, log = tmp_path / "out", tmp_path / "labels.log"

    def tail() -> str:
        return log.read_text(errors="replace")[-1500:]

    with open(log, "w") as f:
        demo_proc = subprocess.Popen([sys.executable, str(presets.ROOT / "tools" / "demo.py"), "--size", "smoke",
                                      "--jobs", "2", "--output", str(out)], stdout=f, stderr=subprocess.STDOUT)
    family: dict[int, str] = {}  # the demo's descendants as last seen: pid -> command line

    def look() -> None:
        procs = _processes()
        family.update({p: procs[p][2] for p in _descendants(demo_proc.pid, procs)})

    try:
        deadline = time.time() + 180
        while time.time() < deadline and demo_proc.poll() is None:
            look()
            if any("train_net.py" in cmd for cmd in family.values()):
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"no train_net.py started under the demo's workers; its output:\n{tail()}")
        look()
        demo_proc.send_signal(signal.SIGTERM)
        look()  # anything started as the signal arrived
        assert demo_proc.wait(timeout=60) != 0
        deadline = time.time() + 30
        while time.time() < deadline:
            now = _processes()
            alive = {p for p, cmd in family.items() if p in now and now[p][2] == cmd and now[p][1] != "Z"}
            if not alive:
                break
            time.sleep(0.2)
        assert not alive, f"still running after the demo ended: {[family[p] for p in alive]}; output:\n{tail()}"
        assert not list(out.glob("seed0/detection/*/ap.json"))  # the first detector was stopped, not finished
    finally:  # leave nothing running, whatever failed (only processes whose pid still has the same command line)
        if demo_proc.poll() is None:
            demo_proc.kill()
        now = _processes()
        for pid, cmd in family.items():
            if pid in now and now[pid][2] == cmd:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        demo_proc.wait()


def test_tasks_run_after_what_they_need_and_the_first_failure_stops_the_rest(tmp_path):
    order = []

    def step(name, value):
        order.append(name)
        return value

    tasks = [scheduler.Task("c", lambda r: (step, ("c", r["a"] + r["b"])), after=["a", "b"]),
             scheduler.Task("a", lambda r: (step, ("a", 1))),
             scheduler.Task("b", lambda r: (step, ("b", 2)), finished=None),
             scheduler.Task("d", lambda r: (step, ("d", 0)), finished=7)]  # reused: never run
    results = scheduler.run_tasks(tasks, None, 1, 1, tmp_path, lambda: (0, ""), total=1, desc="")
    assert results == {"a": 1, "b": 2, "c": 3, "d": 7} and order == ["a", "b", "c"]

    def fail():
        raise ConfigError("broken")

    tasks = [scheduler.Task("x", lambda r: (fail, ())), scheduler.Task("y", lambda r: (step, ("y", 0)), after=["x"])]
    with pytest.raises(ConfigError, match="broken"):
        scheduler.run_tasks(tasks, None, 1, 1, tmp_path, lambda: (0, ""), total=1, desc="")
    assert "y" not in order
    with pytest.raises(ConfigError, match="--jobs 0"):
        scheduler.plan_jobs(0)
    assert scheduler.plan_jobs(1) == (1, torch.get_num_threads())
