"""What the demo calls its runs, on the console and in the report, and its console lines."""
from __future__ import annotations

import time

METHODS = ("mae", "crossmae")
NAMES = {"mae": "MAE", "crossmae": "CrossMAE"}
CONTROLS = {"step0": "not pretrained (step 0)", "vitdet_random": "ViTDet random init"}
DETECTOR_ORDER = ("vitdet_random", "step0", *METHODS)  # the report's rows
FROZEN = "_frozen"  # the suffix of a detector run with the backbone frozen
DETECTION_EVIDENCE = "docs/results/detection_transfer.md"
# what the report says of a preset whose detection stage has not been shown to rank backbones (`ranks_backbones`)
PIPELINE_CHECK = ("This table is a check that conversion, fine-tuning and evaluation run, not a ranking of the "
                  "backbones: on a 2-core CPU no pretrained encoder has yet beaten its step-0 control in fine-tuned "
                  "AP, at any schedule tried (evidence: `" + DETECTION_EVIDENCE + "`). The object probe and the "
                  "curves against compute above carry the comparison of MAE and CrossMAE.")

__all__ = ["METHODS", "NAMES", "CONTROLS", "DETECTOR_ORDER", "FROZEN", "DETECTION_EVIDENCE", "PIPELINE_CHECK",
           "detector_run", "detector_label", "log"]


def detector_run(key: str, frozen: bool) -> str:
    """The name of a detector run (its folder under `detection/`): the init's key, `_frozen` when frozen."""
    return key + (FROZEN if frozen else "")


def detector_label(run: str) -> str:
    """A detector run's label: 'MAE', 'not pretrained (step 0), frozen backbone', ..."""
    key = run.removesuffix(FROZEN)
    return (CONTROLS.get(key) or NAMES[key]) + (", frozen backbone" if run.endswith(FROZEN) else "")


def log(msg: str) -> None:
    """One console line of the demo, with the time."""
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)
