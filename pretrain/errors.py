"""Errors a user can fix, and how command lines report them.

Library code raises a `UserError` subclass whose message is one line saying what is wrong and what to
do. Only a command line turns it into output and an exit status: `command` wraps an entry point so that
such an error prints `error: <message>` on stderr and returns 2, and Ctrl-C returns 130.
"""
from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence


class UserError(Exception):
    """A problem with the user's input; `str(error)` is the one-line message."""


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


Main = Callable[[Sequence[str] | None], int | None]


def command(main: Main) -> Callable[[Sequence[str] | None], int]:
    """Wrap a command-line entry point `main(argv)`: returns its exit status (0 for None), 2 after printing
    a `UserError` as one `error:` line on stderr, 130 on Ctrl-C."""
    @functools.wraps(main)
    def run(argv: Sequence[str] | None = None) -> int:
        try:
            return int(main(argv) or 0)
        except UserError as e:
            print(f"error: {one_line(e)}", file=sys.stderr)
            return getattr(e, "exit_code", 2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
    return run
