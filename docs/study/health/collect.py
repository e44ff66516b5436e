"""Gather what docs/study/health shows from a finished `mls study --grid health` folder (and a demo run):

- ``watch_replay.json``: each run's logged ‖mean(Q_z)‖ and effective rank per log step, with whether the run
  ended degraded (validation mAP more than 10 points below its MoCo-v2 control with the same seed); the
  tests replay it through the health watch (tests/test_watch.py), so its limits stay those the runs support;
- ``early.png``: the first 100 steps of seed 0 of each variant (alignment, the mean logit of the negatives,
  ‖mean(Q_z)‖, the forces on z1), where the paper's setting goes wrong;
- ``measures.md``: per variant, the measures the explanation rests on at a few steps (mean ± std over the
  seeds with a log);
- ``rankme.md``: whether the effective rank at the end of a run (RankMe, label-free) orders the cells as the
  probe's mAP does (Spearman's rank correlation over every cell with a log).

    python docs/study/health/collect.py STUDY_FOLDER [--demo RUN_FOLDER] [--out docs/study/health]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from mls.study.grids import UNRECORDED_BASE, resolve_cell
from mls.study.outputs import reference
from mls.train.settings import PretrainSettings
from mls.viz.curves import find_metrics, read_metrics

DEGRADED_BY = 10.0  # mAP points below the control that count as degraded


def cell_logs(study: Path) -> list[dict]:
    """Every cell of the study with a CSV log: variant, seed, scores and its series."""
    results = json.loads((study / "results.json").read_text())
    cells = []
    for cell in results["cells"].values():
        run = Path(cell.get("run", ""))
        if (run / "csv").is_dir():
            cells.append({**cell, "series": read_metrics(*find_metrics(run / "csv"))})
    return cells, results


def replay_record(cells: list[dict], results: dict, demo: Path | None) -> dict:
    scores = {(c["variant"], c["seed"]): c["scores"]["val_map"] for c in results["cells"].values()}
    variants = {c["variant"] for c in results["cells"].values()}
    runs = []
    for cell in cells:
        control = scores.get((reference(cell["variant"], variants), cell["seed"]))
        own = cell["scores"]["val_map"]
        degraded = control is not None and own < control - DEGRADED_BY
        settings = resolve_cell(cell["settings"], cell.get("base", UNRECORDED_BASE))
        runs.append(entry(f"{cell['variant']} seed {cell['seed']}", settings, cell["series"], degraded, own, control))
    if demo is not None:  # the demo as shipped: level with MoCo-v2 in the lambda and finalists grids
        runs.append(entry("demo (mls pretrain)", PretrainSettings.resolve({}), read_metrics(*find_metrics(demo / "csv")),
                          False, None, None))
    return {"degraded_by": DEGRADED_BY, "runs": runs}


def entry(name: str, settings: PretrainSettings, series: dict, degraded: bool, own, control) -> dict:
    rank = dict(series["health/rank_z"])
    log = [[int(x), round(v, 4), round(rank[x], 3)] for x, v in series["health/mean_norm"]]
    return {"name": name, "method": settings.model.method,
            "steps_per_epoch": settings.train.num_images // settings.train.batch_size, "degraded": degraded,
            "val_map": own, "control_val_map": control, "log": log}


def early_figure(cells: list[dict], out: Path, last_step: int = 100) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {"health/alignment": "alignment E‖z1 − z2‖² (4: opposite)",
             "health/logit_neg": "mean logit p/τ of the negatives",
             "health/mean_norm": "‖mean(Q_z)‖ (1: all keys alike)",
             "health/grad_extra_neg": "extra loss's negative terms: force on z1\n(λ not applied; λ = 0 before the start)"}
    fig, axes = plt.subplots(1, len(names), figsize=(4.4 * len(names), 3.3))
    seed0 = sorted((c for c in cells if c["seed"] == 0), key=lambda c: c["variant"])
    for ax, name in zip(axes, names):
        for n, cell in enumerate(seed0):
            points = [(x, v) for x, v in cell["series"].get(name, []) if x <= last_step]
            if points:
                ax.plot(*zip(*points), marker=".", color=f"C{n}", label=cell["variant"])
        ax.set_title(names[name], fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"the first {last_step} steps, seed 0 of each variant", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


# (measure, step or "mean" over the run, heading)
MEASURES = [
    ("health/alignment", 9, "alignment at step 9"),
    ("health/logit_neg", 9, "logit p/τ of the negatives at step 9"),
    ("health/mean_norm", 9, "‖mean(Q_z)‖ at step 9"),
    ("health/mean_norm", 99, "at step 99"),
    ("health/mean_norm", 239, "at step 239"),
    ("health/uniformity", 239, "uniformity at step 239"),
    ("health/rank_z", 239, "RankMe of Q_z at step 239"),
    ("health/grad_extra_pos", "mean", "force of the positive terms (mean over steps)"),
    ("health/grad_extra_neg", "mean", "force of the negative terms"),
    ("health/grad_infonce", "mean", "InfoNCE's force"),
]


def measures_table(cells: list[dict]) -> str:
    import statistics

    variants = sorted({c["variant"] for c in cells})
    lines = ["| variant | runs | " + " | ".join(h for _, _, h in MEASURES) + " |",
             "|---|---|" + "---|" * len(MEASURES)]
    for variant in variants:
        runs = [c["series"] for c in cells if c["variant"] == variant]
        row = []
        for name, at, _ in MEASURES:
            values = []
            for series in runs:
                points = dict(series.get(name, []))
                if not points:
                    continue
                values.append(statistics.fmean(points.values()) if at == "mean" else points.get(at))
            values = [v for v in values if v is not None]
            if not values:
                row.append("–")
            elif len(values) == 1:
                row.append(f"{values[0]:.2f}")
            else:
                row.append(f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}")
        lines.append(f"| {variant} | {len(runs)} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def rankme(cells: list[dict]) -> str:
    """RankMe of Q_z at the end of each run against its validation mAP: Spearman's ρ over every run, and over the
    runs of one embedding size (RankMe counts dimensions, so it compares runs of the same dz)."""
    from scipy.stats import spearmanr

    rows = [(c["variant"], c["seed"], resolve_cell(c["settings"], c.get("base", UNRECORDED_BASE)).model.dim,
             c["series"]["health/rank_z"][-1][1],
             c["scores"]["val_map"]) for c in cells]
    lines = ["| variant | seed | dz | RankMe of Q_z at the end | val mAP |", "|---|---|---|---|---|"]
    lines += [f"| {v} | {s} | {d} | {r:.1f} | {m:.1f} |" for v, s, d, r, m in sorted(rows, key=lambda r: -r[4])]
    lines.append("")
    groups = {"every run": rows, **{f"dz = {d}": [r for r in rows if r[2] == d] for d in sorted({r[2] for r in rows})}}
    for name, group in groups.items():
        if len(group) >= 3:
            rho, p = spearmanr([r[3] for r in group], [r[4] for r in group])
            lines.append(f"- {name} ({len(group)} runs): Spearman's ρ = {rho:.2f} (p = {p:.2g})")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", type=Path)
    parser.add_argument("--demo", type=Path)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = parser.parse_args()
    cells, results = cell_logs(args.study)
    (args.out / "watch_replay.json").write_text(json.dumps(replay_record(cells, results, args.demo)) + "\n")
    early_figure(cells, args.out / "early.png")
    (args.out / "rankme.md").write_text(rankme(cells))
    (args.out / "measures.md").write_text(measures_table(cells))
    print((args.out / "measures.md").read_text())
    print((args.out / "rankme.md").read_text())


if __name__ == "__main__":
    main()
