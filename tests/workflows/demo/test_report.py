"""The demo report's detection section (`workflows.demo.report.detection_section`): a preset whose detection stage
has not been shown to rank backbones gets its AP table labelled a pipeline check, with evidence that exists."""
from detection.report import scored
from workflows.demo.labels import DETECTION_EVIDENCE, PIPELINE_CHECK
from workflows.demo.presets import ROOT, load_preset, presets
from workflows.demo.report import detection_section


def _numbers() -> dict:
    ap = {"bbox": {"AP": 1.5, "AP50": 4.0, "AP75": 0.0}, "segm": {"AP": 0.5, "AP50": 1.0, "AP75": 0.0}}
    return {"ap": {"step0": [scored(ap)], "mae": [scored(ap)]}, "ap_differences": {}}


def test_an_unproven_detection_stage_is_labelled_a_pipeline_check_with_its_evidence():
    cfg = {"detection": {"ranks_backbones": False}}
    text = "\n".join(detection_section(cfg, [{"seed": 0}], _numbers()))
    assert "a pipeline check, not a ranking" in text.splitlines()[0] and PIPELINE_CHECK in text
    assert (ROOT / DETECTION_EVIDENCE).is_file()  # the evidence the label points at ships with the project
    ranked = "\n".join(detection_section({"detection": {"ranks_backbones": True}}, [{"seed": 0}], _numbers()))
    assert "pipeline check" not in ranked and "| MAE |" in ranked and "| MAE |" in text


def test_every_shipped_preset_says_whether_its_detection_stage_ranks_backbones():
    for name in presets():
        assert isinstance(load_preset(name)["detection"].get("ranks_backbones"), bool), name
