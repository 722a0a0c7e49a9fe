"""The demo report (`workflows.demo.report`): a preset whose detection stage has not been shown to rank backbones
gets its AP table labelled a pipeline check, with evidence that exists; the probe section states the chance levels
of the detection set's objects."""
from detection.report import scored
from workflows.demo.data import object_chance
from workflows.demo.labels import DETECTION_EVIDENCE, METHODS, PIPELINE_CHECK
from workflows.demo.presets import ROOT, load_preset, presets
from workflows.demo.report import detection_section, probe_section


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


def test_the_probe_section_states_the_chance_levels_of_the_objects(counted_objects):
    sets = {split: (str(counted_objects / f"{split}.json"), str(counted_objects)) for split in ("train", "val")}
    chance, classes = object_chance(sets)
    assert chance == {"uniform": 0.25, "majority": 0.4, "majority_class": 0} and classes == ["a", "b", "c", "d"]
    health = {"std": 1.0, "dominance": 2.0, "token_norm": 3.0}
    point = {"knn": 0.5, "linear": 0.6, "heldout_loss": 1.0, "health": health}
    numbers = {"final": {m: [point] for m in METHODS}, "step0": [point], "probe_differences": {},
               "beats": {m: {"knn": True, "linear": True} for m in METHODS}}
    cfg = {"probe": {"block": -1, "k": 20, "temperature": 0.07, "epochs": 100}}
    text = "\n".join(probe_section(cfg, numbers, chance, classes))
    assert ("Chance on the val objects, for both probes and both views: 1/4 classes 0.250, majority class 'a' 0.400"
            in text)
