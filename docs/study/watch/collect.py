"""Gather the health watch's out-of-sample check (docs/study/watch) from finished `mls study --grid watch` folders.

Each folder is one condition (the real-photo set; the built-in scenes at another batch, size or queue). Every run
is labelled by its probe, not by the rule: *harmful* when its validation mAP is ``HARMFUL_BY`` or more below the
MoCo-v2 run of its condition with the same seed (docs/study/PREDICTIONS.md, entry 1). Each run's logged measures
are replayed through ``mls.train.watch.HealthWatch``; a warning on a healthy run is a false alarm, a harmful run
without one a miss. Writes:

- ``replay.json``: every run's measures per log step, its label and the counts (tests/test_watch.py replays it);
- ``results.md``: the counts per condition and a row per run.

    python docs/study/watch/collect.py runs/watch/photos runs/watch/scenes_32px ... [--out docs/study/watch]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from mls.train.watch import HealthWatch, force_ratio
from mls.viz.curves import find_metrics, read_metrics

HARMFUL_BY = 10.0  # mAP points below the condition's MoCo-v2 (same seed) that make a run harmful
COLUMNS = ("mean_norm", "rank_z", "grad_infonce", "grad_extra_neg", "extra_weight")


def run_log(run: Path) -> list[list]:
    """[step, *COLUMNS] per log step (None where a column is not logged, e.g. MoCo-v2's extra force)."""
    series = read_metrics(*find_metrics(run / "csv"))
    named = {name: dict(series.get(f"health/{name}", [])) for name in COLUMNS}
    named["extra_weight"] = dict(series.get("train/extra_weight", []))
    steps = sorted(named["mean_norm"])
    return [[int(step), *(None if step not in named[c] else round(named[c][step], 5) for c in COLUMNS)]
            for step in steps]


def replay(method: str, log: list[list]) -> HealthWatch:
    watch = HealthWatch()
    for step, *values in log:
        watch.observe(step, {c: v for c, v in zip(COLUMNS, values) if v is not None}, method)
    return watch


def condition_runs(folder: Path) -> list[dict]:
    results = json.loads((folder / "results.json").read_text())
    cells = list(results["cells"].values())
    control = {c["seed"]: c["scores"]["val_map"] for c in cells if c["variant"] == "mocov2"}
    runs = []
    for cell in sorted(cells, key=lambda c: (c["seed"], c["variant"])):
        run = Path(cell["run"])
        if not (run / "csv").is_dir() or cell["seed"] not in control:
            continue
        method = cell["settings"].get("method", "mls")
        own = cell["scores"]["val_map"]
        log = run_log(run)
        watch = replay(method, log)
        episodes = [e for t in watch.tracks.values() for e in t.episodes]
        ratios = [force_ratio(dict(zip(COLUMNS, v))) for _, *v in log] if method == "mls" else []
        runs.append({
            "name": f"{folder.name}: {cell['variant']} seed {cell['seed']}", "condition": folder.name,
            "variant": cell["variant"], "seed": cell["seed"], "method": method, "val_map": own,
            "control_val_map": control[cell["seed"]], "harmful": own <= control[cell["seed"]] - HARMFUL_BY,
            "warned_at": min((e.step for e in episodes), default=None),
            "max_ratio": max((r for r in ratios if r is not None), default=None),
            "end_mean_norm": log[-1][1], "log": log})
    return runs


def counts(runs: list[dict]) -> tuple[int, int]:
    """False alarms (a healthy run warned) and misses (a harmful run not warned)."""
    return (sum(r["warned_at"] is not None and not r["harmful"] for r in runs),
            sum(r["harmful"] and r["warned_at"] is None for r in runs))


def table(runs: list[dict]) -> str:
    lines = ["| condition | runs | healthy | harmful | false alarms | misses |", "|---|---|---|---|---|---|"]
    for condition in dict.fromkeys(r["condition"] for r in runs):
        rs = [r for r in runs if r["condition"] == condition]
        alarms, misses = counts(rs)
        lines.append(f"| {condition} | {len(rs)} | {sum(not r['harmful'] for r in rs)} | {sum(r['harmful'] for r in rs)} "
                     f"| {alarms} | {misses} |")
    lines += ["", "| run | val mAP | Δ vs MoCo-v2 | harmful | warned at step | largest λ·F_neg/F_InfoNCE "
              "| ‖mean(Q_z)‖ at the end |",
              "|---|---|---|---|---|---|---|"]
    for r in runs:
        ratio = "–" if r["max_ratio"] is None else f"{r['max_ratio']:.2f}"
        lines.append(f"| {r['name']} | {r['val_map']:.1f} | {r['val_map'] - r['control_val_map']:+.1f} | "
                     f"{'yes' if r['harmful'] else 'no'} | {r['warned_at'] or '–'} | {ratio} | {r['end_mean_norm']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="mls study --grid watch output folders, one per condition")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = parser.parse_args()
    runs = [r for folder in args.folders for r in condition_runs(folder)]
    false_alarms, misses = counts(runs)
    record = {"harmful_by": HARMFUL_BY, "columns": list(COLUMNS), "false_alarms": false_alarms, "misses": misses,
              "runs": runs}
    (args.out / "replay.json").write_text(json.dumps(record) + "\n")
    (args.out / "results.md").write_text(table(runs))
    print(table(runs))


if __name__ == "__main__":
    main()
