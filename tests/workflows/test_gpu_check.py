"""The GPU readiness check (`workflows.gpu_check`, `tools/gpu_check.sh`): the `--device cpu --tiny` dry run end to
end, steps that fail, time out or need a newer torch are reported while the others still run, and carried wheels
are installed into a temporary site without network."""
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import matplotlib.image
import pytest

from workflows import gpu_check
from workflows.gpu_check.steps import compiled_ratios

ROOT = Path(__file__).resolve().parents[2]


def _rows(report: str) -> dict[str, str]:
    """step -> outcome, from the report's table."""
    cells = [line.strip("|").split("|") for line in report.splitlines() if line.startswith("| ")]
    return {c[0].strip(): c[1].strip() for c in cells if c[0].strip() in gpu_check.STEPS}


@pytest.mark.slow  # every step's tools in child processes, about a minute on CPU
def test_dry_run_end_to_end_reports_every_step(tmp_path):
    out = tmp_path / "check"
    assert gpu_check.main(["--device", "cpu", "--tiny", "--wheels", "", "--out", str(out), "--commit", "abc123"]) == 0
    result = json.loads((out / "gpu_check.json").read_text())
    status = {s["name"]: s["status"] for s in result["steps"]}
    assert status == {"stack": "ok", "pretrain": "ok", "benchmark": "ok", "detection": "ok", "demo": "skipped"}
    assert result["device"] == "CPU" and result["commit"] == "abc123" and result["torch"]
    report = (out / "benchmark_gpu.md").read_text()
    assert _rows(report) == status
    assert "dry run" in report and "commit: abc123" in report and "## Benchmark" in report
    steps = {s["name"]: s for s in result["steps"]}
    for method in ("mae", "crossmae"):  # resumed from epoch 0's checkpoint: on CPU the same loss exactly
        d = steps["pretrain"]["details"][method]
        assert len(d["losses"]) == 2 and d["relative_difference"] == 0.0
        assert (out / "pretrain" / method / "full" / "checkpoint-0.pth").is_file()
    fsdp = steps["pretrain"]["details"]["crossmae_fsdp"]  # FSDP2 in one process: DDP's losses on CPU, and resumed
    assert len(fsdp["losses"]) == 2 and fsdp["relative_difference"] < 1e-4
    assert fsdp["resumed_loss"] == pytest.approx(fsdp["losses"][-1], rel=1e-4)
    assert (out / "pretrain" / "crossmae_fsdp" / "full" / "checkpoint-0.dcp").is_dir()
    assert [r["variant"] for r in steps["benchmark"]["details"]["ratios"]] == ["CrossMAE p=0.25 d=12",
                                                                               "CrossMAE p=0.75 d=12"]
    assert (out / "detection" / "sdpa" / "ap.json").is_file()
    assert "--tiny" in steps["demo"]["summary"]
    assert matplotlib.image.imread(out / "gpu_check.png").ndim == 3


@pytest.mark.slow  # a child killed at a 6 s limit
def test_a_failing_a_late_and_a_too_new_step_are_reported_and_the_rest_still_run(tmp_path, monkeypatch):
    def boom(check):
        raise RuntimeError("boom")

    def sleeps(check):
        check.python("-c", "import time; time.sleep(60)")
        return "never", {}

    monkeypatch.setattr(gpu_check.steps, "STEP_FUNCTIONS", {
        "stack": boom, "pretrain": sleeps, "benchmark": lambda c: ("not reached", {}),
        "detection": lambda c: ("fine", {"x": 1}), "demo": lambda c: ("fine too", {})})
    monkeypatch.setitem(gpu_check.runner.SHARES, "pretrain", 6)
    monkeypatch.setattr(gpu_check.runner, "MIN_TORCH", {"benchmark": (99, 0)})
    start = time.monotonic()
    code = gpu_check.main(["--device", "cpu", "--out", str(tmp_path), "--wheels", "", "--budget", "480"])
    assert time.monotonic() - start < 40  # the sleeping child was killed at its step's limit
    assert code == 1
    steps = {s["name"]: s for s in json.loads((tmp_path / "gpu_check.json").read_text())["steps"]}
    assert {k: s["status"] for k, s in steps.items()} == {
        "stack": "failed", "pretrain": "timed out", "benchmark": "skipped", "detection": "ok", "demo": "ok"}
    assert steps["stack"]["summary"] == "RuntimeError: boom"
    assert "needs torch 99.0" in steps["benchmark"]["summary"]
    assert _rows((tmp_path / "benchmark_gpu.md").read_text())["pretrain"] == "timed out"


def test_unknown_step_and_bad_budget_are_one_line_errors(tmp_path, one_error_line):
    assert gpu_check.main(["--steps", "stack", "train", "--out", str(tmp_path)]) == 2
    one_error_line("--steps train", "choose from stack pretrain benchmark detection demo")
    assert gpu_check.main(["--budget", "0", "--out", str(tmp_path)]) == 2
    one_error_line("--budget 0 must be positive")


def _wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel, `gpucheckprobe` 1.0."""
    path = folder / "gpucheckprobe-1.0-py3-none-any.whl"
    info = "gpucheckprobe-1.0.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("gpucheckprobe/__init__.py", "VALUE = 42\n")
        z.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: gpucheckprobe\nVersion: 1.0\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


@pytest.mark.slow  # pip and the stack probe in child processes, several seconds
def test_carried_wheels_go_into_a_temporary_site_seen_by_the_steps(tmp_path, monkeypatch):
    wheels = tmp_path / "whl"
    wheels.mkdir()
    _wheel(wheels)
    seen = {}

    def probe(check):  # a later step: its children import from the temporary site
        seen["site"] = check.site
        text = check.python("-c", "import gpucheckprobe; print('VALUE', gpucheckprobe.VALUE)")
        return text.strip().splitlines()[-1], {}

    monkeypatch.setitem(gpu_check.steps.STEP_FUNCTIONS, "pretrain", probe)
    result = gpu_check.run_check(gpu_check.CheckConfig(out=str(tmp_path / "out"), device="cpu", tiny=True,
                                                       wheels=str(wheels), steps=("stack", "pretrain")))
    steps = {s["name"]: s for s in result["steps"]}
    assert steps["stack"]["status"] == "ok", steps["stack"]["summary"]
    assert steps["stack"]["details"]["installed"] == ["gpucheckprobe-1.0-py3-none-any.whl"]
    assert steps["pretrain"]["summary"] == "VALUE 42"
    assert not seen["site"].exists()  # removed after the check


@pytest.mark.slow  # a fresh interpreter importing the stack, about 4 s
def test_tool_runs_from_a_tree_without_the_installed_package(tmp_path):
    """tools/gpu_check.sh puts the tree on the path itself (the GPU machine has no editable install)."""
    proc = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "--help"], capture_output=True, text=True,
                          timeout=60, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr
    assert "--tiny" in proc.stdout and "--budget" in proc.stdout


def test_compiled_speed_is_read_per_variant_at_the_same_input_size():
    eager = [{"input_size": 224, "variant": "MAE d=8", "step_s": 2.0},
             {"input_size": 224, "variant": "CrossMAE", "step_s": 1.0},
             {"input_size": 448, "variant": "MAE d=8", "step_s": 8.0}]
    compiled = [{"input_size": 224, "variant": "MAE d=8", "step_s": 1.6},
                {"input_size": 224, "variant": "CrossMAE", "step_s": 1.25}]
    assert compiled_ratios(eager, compiled) == {"MAE d=8": pytest.approx(1.25), "CrossMAE": pytest.approx(0.8)}
