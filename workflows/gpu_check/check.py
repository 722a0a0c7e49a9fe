"""The steps' shared state: the check's configuration, a step's outcome, child processes under the step's limit."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pretrain.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
STEPS = ("stack", "pretrain", "benchmark", "detection", "demo")


@dataclass
class CheckConfig:
    """What `run_check` does; the fields are `tools/gpu_check.sh`'s flags."""

    out: str = "output/gpu_check"
    device: str = "cuda"
    tiny: bool = False
    budget: float = 480.0  # seconds for all steps together
    wheels: str | None = None  # folder of carried wheels; None: .whl when it exists; "": none
    steps: Sequence[str] = STEPS
    commit: str | None = None  # None: `git rev-parse`, where there is a .git

    def __post_init__(self) -> None:
        unknown = [s for s in self.steps if s not in STEPS]
        if unknown:
            raise ConfigError(f"--steps {' '.join(unknown)}: no such step; choose from {' '.join(STEPS)}")
        if self.budget <= 0:
            raise ConfigError(f"--budget {self.budget:g} must be positive (seconds)")


@dataclass
class StepResult:
    """One step's outcome: status is ok, failed, timed out or skipped; summary is one line."""

    name: str
    status: str
    seconds: float
    summary: str
    details: dict[str, Any] = field(default_factory=dict)


class StepFailed(Exception):
    """A step's check did not hold; the message is the report's line."""


class StepTimedOut(StepFailed):
    """A child process ran past the step's time limit."""


class StepSkipped(Exception):
    """A step that does not run here; the message says why."""


class Check:
    """The state shared by the steps: output folder, child environment, deadline of the current step."""

    def __init__(self, cfg: CheckConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out).resolve()
        self.logs = self.out / "logs"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1",
                    "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
        self.site: Path | None = None
        self.deadline = 0.0
        self.log: Path = self.logs / "check.log"
        self.port = 29600

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def call(self, args: Sequence[str], cwd: Path = ROOT) -> str:
        """Run a child (its process group killed at the step's deadline); returns its output, also logged.

        Raises:
            StepTimedOut: it ran past the deadline.
            StepFailed: it exited with a non-zero status; the message holds its last error line.
        """
        limit = self.remaining()
        if limit <= 1:
            raise StepTimedOut("no time left in the step's limit")
        with open(self.log, "a") as log:
            log.write(f"$ {' '.join(map(str, args))}\n")
            log.flush()
            start = log.tell()
            proc = subprocess.Popen([str(a) for a in args], cwd=cwd, env=self.env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                raise StepTimedOut(f"{Path(str(args[1]) if len(args) > 1 else str(args[0])).name} ran past the "
                                   f"step's limit") from None
        text = self.log.read_bytes()[start:].decode(errors="replace")
        if rc:
            raise StepFailed(f"exit {rc}: {_last_error(text)} (log: {self.log.relative_to(self.out)})")
        return text

    def python(self, *args: Any) -> str:
        return self.call([sys.executable, *map(str, args)])

    def torchrun(self, tool: str, *args: Any) -> str:
        self.port += 1
        return self.call([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
                          "--master_port", str(self.port), str(ROOT / tool), *map(str, args)])


def _kill_group(proc: subprocess.Popen) -> None:
    """End a child and everything it started (torchrun's workers, data loader workers)."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _last_error(text: str) -> str:
    """The most telling line of a failed child's output: its `error:` line or exception, else its last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error: ") or re.match(r"^[A-Za-z_.]*(Error|Exception)\b", line):
            return line[:300]
    return lines[-1][:300] if lines else "no output"

