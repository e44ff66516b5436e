"""Gather entry 3 of docs/study/PREDICTIONS.md ("bunched keys, common push") from a finished
`mls study --grid configs/spread_start.yaml` folder and the health grid's stored cells.

Per seed: the spread start's validation mAP against its MoCo-v2 (10 epochs, the same m and dz), the paired Δ, and
‖mean(Q_z)‖ at the last log step of each; beside them, the paper's setting from the first step against its MoCo-v2
(docs/study/health/results.json, `paper` and `mocov2_paper`). Prints a Markdown table and the registered verdicts.

    python docs/study/spread_start/collect.py runs/spread_start [--health docs/study/health/results.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from mls.viz.curves import find_metrics, read_metrics


def end_spread(run: Path) -> float | None:
    """‖mean(Q_z)‖ at the run's last log step (its CSV logs, every resumed part joined)."""
    if not (run / "csv").is_dir():
        return None
    series = read_metrics(*find_metrics(run / "csv")).get("health/mean_norm", [])
    return series[-1][1] if series else None


def by_seed(results: dict, variant: str) -> dict[int, dict]:
    return {c["seed"]: c for c in results["cells"].values() if c["variant"] == variant}


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):+.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{values[0]:+.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--health", type=Path, default=Path(__file__).parents[1] / "health" / "results.json")
    args = parser.parse_args()
    spread = json.loads((args.folder / "results.json").read_text())
    health = json.loads(args.health.read_text())
    start, control = by_seed(spread, "spread_start"), by_seed(spread, "mocov2_spread_start")
    paper, paper_control = by_seed(health, "paper"), by_seed(health, "mocov2_paper")
    print("| seed | spread start | its MoCo-v2 | Δ | ‖mean(Q_z)‖ end: spread start / MoCo-v2 "
          "| from the first step | its MoCo-v2 | Δ |")
    print("|---|---|---|---|---|---|---|---|")
    deltas, gaps, first = [], [], []
    for seed in sorted(set(start) & set(control)):
        own, ref = start[seed]["scores"]["val_map"], control[seed]["scores"]["val_map"]
        norms = end_spread(Path(start[seed]["run"])), end_spread(Path(control[seed]["run"]))
        deltas.append(own - ref)
        if None not in norms:
            gaps.append(norms[0] - norms[1])
        row = [f"{seed}", f"{own:.1f}", f"{ref:.1f}", f"{own - ref:+.1f}",
               " / ".join("–" if n is None else f"{n:.3f}" for n in norms)]
        if seed in paper and seed in paper_control:
            p, q = paper[seed]["scores"]["val_map"], paper_control[seed]["scores"]["val_map"]
            first.append(p - q)
            row += [f"{p:.1f}", f"{q:.1f}", f"{p - q:+.1f}"]
        else:
            row += ["–"] * 3
        print("| " + " | ".join(row) + " |")
    if not deltas:
        return
    print(f"\nspread start: Δ val mAP {mean_std(deltas)} over {len(deltas)} seeds (registered: above −5); "
          f"‖mean(Q_z)‖ end minus its MoCo-v2's: "
          + (", ".join(f"{g:+.3f}" for g in gaps) + " (registered: within 0.1)" if gaps else "not logged"))
    if first:
        print(f"from the first step: Δ val mAP {mean_std(first)} (registered: at most −10)")


if __name__ == "__main__":
    main()
