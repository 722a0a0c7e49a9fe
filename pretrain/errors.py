"""Errors a user can fix, and how command lines report them.

Library code raises a `UserError` subclass whose message is one line saying what is wrong and what to
do. Only a command line turns it into output and an exit status: `command` wraps an entry point so that
such an error prints `error: <message>` on stderr and returns 2 (or the error's own `exit_code`). Ctrl-C returns
130 and SIGTERM (a `kill`, a scheduler's stop), which `command` raises as `Terminated`, a KeyboardInterrupt, so
that it unwinds as Ctrl-C does, returns 143: 128 + the signal's number, as a shell reports either.
"""
from __future__ import annotations

import functools
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager


class UserError(Exception):
    """A problem with the user's input; `str(error)` is the one-line message. `quiet`: a process of a distributed run
    whose main process reports the same stop prints nothing (its exit status still says it)."""

    quiet = False


class ConfigError(UserError, ValueError):
    """A configuration value or command-line flag that cannot work."""


class CheckpointError(UserError, ValueError):
    """A weights file that is missing, unreadable, unsafe to load, or of the wrong kind or shape."""


class UntrustedPickleError(CheckpointError):
    """A weights file holding pickled Python objects: loading it runs code, which only `--trust-pickle` allows."""


class DataError(UserError, ValueError):
    """A dataset, image or annotation that is missing or unusable."""


def one_line(e: BaseException) -> str:
    """An exception's message on one line; for one re-raised from a DataLoader worker (whose message is the
    worker's whole traceback), the original message."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught "):
        return lines[-1].split(": ", 1)[1] if ": " in lines[-1] else lines[-1]
    return " ".join(lines)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread while a `command` runs, so that a run stops as on Ctrl-C."""


def interrupt_status(e: KeyboardInterrupt) -> int:
    """The exit status of a command stopped by `e`: 128 + the signal's number, 143 for SIGTERM, 130 for Ctrl-C."""
    return 128 + (signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)


def interrupt_name(e: KeyboardInterrupt) -> str:
    """How a message names the stop: "terminated (SIGTERM)" or "interrupted"."""
    return "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"


def _raise_terminated(*_: object) -> None:
    raise Terminated


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises `Terminated` (signal handlers can only be set from the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


Main = Callable[[Sequence[str] | None], int | None]


def command(main: Main) -> Callable[[Sequence[str] | None], int]:
    """Wrap a command-line entry point `main(argv)`: returns its exit status (0 for None), 2 (or the error's
    `exit_code`) after printing a `UserError` as one `error:` line on stderr, 130 on Ctrl-C, 143 on SIGTERM."""
    @functools.wraps(main)
    def run(argv: Sequence[str] | None = None) -> int:
        try:
            with _sigterm_as_interrupt():
                return int(main(argv) or 0)
        except UserError as e:
            if not e.quiet:
                print(f"error: {one_line(e)}", file=sys.stderr)
            return getattr(e, "exit_code", 2)
        except KeyboardInterrupt as e:
            print(interrupt_name(e), file=sys.stderr)
            return interrupt_status(e)
    return run
