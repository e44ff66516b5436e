"""Results of repeated runs: mean and standard deviation per metric, written as JSON and as a Markdown table."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

COLUMNS = ("dataset", "protocol", "metric", "mean", "std", "runs", "weights")


def summarise(per_run: list[dict[str, float]]) -> list[dict]:
    """One entry per metric (in the runs' order, headline first): mean, sample std (0 for one run), values."""
    rows = []
    for i, name in enumerate(per_run[0]):
        values = [run[name] for run in per_run]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append({"metric": name, "mean": statistics.fmean(values), "std": std, "values": values,
                     "headline": i == 0})
    return rows


def markdown_table(results: list[dict]) -> str:
    """A Markdown table with one line per (result, metric)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for result in results:
        for m in result["metrics"]:
            cells = (result["dataset"], result["protocol"], m["metric"] + (" (headline)" if m["headline"] else ""),
                     f"{m['mean']:.2f}", f"{m['std']:.2f}", str(result["runs"]), result["weights"])
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(out: str | Path, result: dict) -> str:
    """Write ``out/results.json`` and ``out/results.md``; return the Markdown table."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown_table([result])
    (out / "results.md").write_text(table)
    return table
