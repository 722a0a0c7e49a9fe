"""Every finished step of the demo is reused, and refused in one line when it was made with other settings; a
weights file the demo reads back (`read_own`: the step-0 weights, snapshots) must be one it wrote."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from pretrain.errors import CheckpointError, ConfigError, UntrustedPickleError
from pretrain.files import read_checkpoint

__all__ = ["settings_of", "check_reusable", "read_own"]


def settings_of(cfg: dict, drop: Sequence[str] = ("output_dir", "resume")) -> dict:
    """What a step's results depend on, in JSON form: its config without where it was written."""
    return json.loads(json.dumps({k: v for k, v in cfg.items() if k not in drop}))


def check_reusable(run_dir: Path, stored: dict, wanted: dict) -> None:
    """Refuse to reuse a finished step that was made with other settings (or by an older demo).

    Raises:
        ConfigError: naming the settings that differ, and --fresh / --output.
    """
    if stored == wanted:
        return

    def show(old, new) -> str:
        if isinstance(old, list) and isinstance(new, list):  # override lists: only the items that differ
            old, new = [x for x in old if x not in new], [x for x in new if x not in old]
        return f"{old} -> {new}"

    diff = [f"{k}: {show(stored.get(k, 'not recorded'), wanted.get(k))}" for k in sorted(wanted)
            if stored.get(k) != wanted.get(k)]
    raise ConfigError(f"{run_dir} was made with other settings than this run ({'; '.join(diff)[:300]}); "
                      "start over with --fresh or write to another --output")


def read_own(path: Path) -> dict:
    """A weights file the demo wrote (plain tensors in a dict), read back through `read_checkpoint`; the demo never
    trusts pickles, since it never writes them.

    Raises:
        CheckpointError: the file is unreadable (`read_checkpoint`'s line), or holds pickled Python objects or no
            dict: not the demo's; one line naming --fresh.
    """
    try:
        loaded = read_checkpoint(path)
    except UntrustedPickleError:
        loaded = "pickled Python objects"
    if not isinstance(loaded, dict):
        what = loaded if isinstance(loaded, str) else f"a {type(loaded).__name__}"
        raise CheckpointError(f"{path} holds {what}, which the demo never writes: it is not the demo's file; delete "
                              "it, or start over with --fresh") from None
    return loaded
