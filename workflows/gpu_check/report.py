"""Step 6 of the GPU check: the Markdown report (`benchmark_gpu.md`) and the plot (`gpu_check.png`) of a result."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pretrain.analysis.figures import save_figure  # noqa: E402


def report_text(result: dict[str, Any]) -> str:
    """The Markdown report: header, one row per step with its outcome, then the benchmark table if there is one."""
    steps = {s["name"]: s for s in result["steps"]}
    lines = [
        "# GPU check" + (" (dry run: --device cpu --tiny, no GPU numbers)" if result["tiny"] else ""), "",
        f"- date: {result['date']}",
        f"- command: `{result['command']}`",
        f"- device: {result['device']}; torch {result['torch']}",
        f"- commit: {result['commit']}",
        f"- budget {result['budget_s']:g} s; took {result['total_s']:.0f} s", "",
        "| step | outcome | seconds | summary |", "|---|---|---|---|",
    ]
    for s in result["steps"]:
        summary = s["summary"].replace("|", "/")
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.0f} | {summary} |")
    bench = steps.get("benchmark", {}).get("details", {})
    if bench.get("table") and Path(bench["table"]).is_file():
        text = Path(bench["table"]).read_text()
        table = [line for line in text.splitlines() if line.startswith("|") or line.startswith("- ")]
        lines += ["", "## Benchmark (tools/benchmark.py)", "", *table]
    lines += ["", "Logs of every child process: `logs/<step>.log` beside this file.", ""]
    return "\n".join(lines)


def plot_check(result: dict[str, Any], path: Path) -> None:
    """Seconds per step (coloured by outcome) and the pretraining losses per epoch, uninterrupted and resumed."""
    colours = {"ok": "tab:green", "failed": "tab:red", "timed out": "tab:orange", "skipped": "tab:gray"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.4))
    steps = result["steps"]
    ax1.barh([s["name"] for s in steps], [s["seconds"] for s in steps],
             color=[colours[s["status"]] for s in steps])
    for i, s in enumerate(steps):
        ax1.text(s["seconds"], i, f" {s['status']}", va="center", fontsize=8)
    ax1.invert_yaxis()
    ax1.set_xlabel("seconds")
    ax1.set_title(f"steps on {result['device']}", fontsize=10)
    pre = next((s["details"] for s in steps if s["name"] == "pretrain"), {})
    for method, d in pre.items():
        line, = ax2.plot(range(len(d["losses"])), d["losses"], marker="o", label=f"{method} uninterrupted")
        ax2.plot([len(d["losses"]) - 1], [d["resumed_loss"]], marker="x", markersize=10, color=line.get_color(),
                 linestyle="none", label=f"{method} resumed")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("train loss")
    ax2.set_title("pretraining under torchrun", fontsize=10)
    if pre:
        ax2.legend(fontsize=7)
    save_figure(fig, path, dpi=80)
