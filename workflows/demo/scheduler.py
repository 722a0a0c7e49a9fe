"""Running the demo's steps side by side: a small scheduler of dependent tasks on a pool of worker processes.

Each worker runs one step at a time at its share of the torch threads, with its stderr (warnings, the progress
bars tqdm then does not draw) in a log file of the step; the tasks run in list order as their dependencies
allow, under one progress bar; the first failure stops the rest. `multiprocessing.Pool` is used for its public
`terminate()`: on a failure, Ctrl-C or SIGTERM the workers get SIGTERM, which they turn into SystemExit, so
that a detector's `subprocess.run` kills the train_net it started.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from multiprocessing.pool import AsyncResult, Pool
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pretrain.errors import ConfigError

__all__ = ["Task", "plan_jobs", "worker_pool", "run_tasks"]


class Task:
    """One step of a seed's run: `make(results)` -> (fn, args) once the tasks named in `after` are done (the
    args can depend on their results); `finished` is its reused result, checked before anything runs."""

    def __init__(self, name: str, make: Callable[[dict], tuple[Callable, tuple]], after: Sequence[str] = (),
                 finished: Any = None) -> None:
        self.name, self.make, self.after, self.finished = name, make, tuple(after), finished


def plan_jobs(jobs: int | None) -> tuple[int, int]:
    """(runs side by side, torch threads each). By default two runs, each on half the threads: small matrices
    scale poorly with threads, so on a 2-core CPU a single-thread pair gets through more work per minute than
    one run at two threads (docs/results/demo.md gives the step times seen on one such machine)."""
    threads = torch.get_num_threads()
    if jobs is None:
        jobs = 2 if threads >= 2 else 1
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs}: give 1 (one run at a time) or more")
    return jobs, max(1, threads // jobs)


def _exit_on_sigterm(*_: Any) -> None:
    raise SystemExit(143)


def _worker_init() -> None:
    """Pool workers turn SIGTERM into SystemExit, so that a detector's `subprocess.run` kills its train_net."""
    signal.signal(signal.SIGTERM, _exit_on_sigterm)


def _in_worker(threads: int, stderr_file: str, fn: Callable, *args: Any) -> Any:
    """fn(*args) in a worker process at `threads` torch threads. Its stderr (warnings, and the progress bars,
    which tqdm then does not draw) goes to `stderr_file`; its one-line console messages still reach stdout."""
    torch.set_num_threads(threads)
    Path(stderr_file).parent.mkdir(parents=True, exist_ok=True)
    saved = os.dup(2)
    with open(stderr_file, "a") as f:
        os.dup2(f.fileno(), 2)
        try:
            return fn(*args)
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


@contextmanager
def worker_pool(jobs: int) -> Iterator[Pool | None]:
    """`jobs` spawned worker processes (None for one job: steps then run in this process), stopped at the end; on
    an exception (a failed step, Ctrl-C, or SIGTERM, which this turns into SystemExit while the block runs) the
    workers are terminated first, so nothing they started keeps running."""
    main_thread = threading.current_thread() is threading.main_thread()
    # a `kill` or `timeout` stops the workers too (signal handlers can only be set from the main thread)
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if main_thread else None
    pool = multiprocessing.get_context("spawn").Pool(jobs, initializer=_worker_init) if jobs > 1 else None
    try:
        yield pool
        if pool is not None:
            pool.close()
    except BaseException:
        if pool is not None:
            pool.terminate()
        raise
    finally:
        if pool is not None:
            pool.join()
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def run_tasks(tasks: Sequence[Task], pool: Pool | None, slots: int, threads: int, log_dir: Path,
              progress: Callable[[], tuple[int, str]], total: int, desc: str) -> dict[str, Any]:
    """Run the tasks, in list order as their dependencies allow, up to `slots` at a time on the workers of `pool`
    (one at a time in this process when `pool` is None), under one progress bar; the first failure stops the rest.

    `progress()` gives (work units done, a status line); `total` is the units of all tasks.
    """
    results = {t.name: t.finished for t in tasks if t.finished is not None}
    todo = [t for t in tasks if t.finished is None]
    bar = tqdm(total=total, desc=desc, unit="step", disable=None if pool is not None else True, leave=False)
    running: dict[str, AsyncResult] = {}
    changed = threading.Event()  # set when a running task ends
    try:
        while todo or running:
            for task in list(todo):
                if len(running) >= slots:
                    break
                if not all(name in results for name in task.after):
                    continue
                todo.remove(task)
                fn, args = task.make(results)
                if pool is None:
                    results[task.name] = fn(*args)
                    continue
                running[task.name] = pool.apply_async(
                    _in_worker, (threads, str(log_dir / f"{task.name}.stderr"), fn, *args),
                    callback=lambda _: changed.set(), error_callback=lambda _: changed.set())
            if not running:
                if todo and not any(all(n in results for n in t.after) for t in todo):
                    raise RuntimeError(f"demo tasks {[t.name for t in todo]} wait on tasks that never ran")
                continue
            changed.wait(timeout=2.0)
            changed.clear()
            units, status = progress()
            bar.update(max(0, min(total, units) - bar.n))
            bar.set_postfix_str(status, refresh=False)
            for name in [n for n, r in running.items() if r.ready()]:
                results[name] = _result(running.pop(name), name, log_dir)
    finally:
        bar.close()
    return results


def _result(result: AsyncResult, name: str, log_dir: Path) -> Any:
    """A finished task's result; its exception, with a note naming the step and its log, re-raised."""
    try:
        return result.get()
    except Exception as error:
        error.add_note(f"(demo step {name}; its log: {log_dir / (name + '.stderr')})")
        raise
