"""Every finished step of the demo is reused, and refused in one line when it was made with other settings."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from pretrain.errors import ConfigError

__all__ = ["settings_of", "check_reusable"]


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
