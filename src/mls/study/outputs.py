"""The outputs of a study: ``results.md`` (mean ± std over pretraining seeds, paired differences to
MoCo-v2 with the same seed) and ``results.png`` (mAP per variant with error bars, neighbour precision)."""
from __future__ import annotations

import math
import statistics
from pathlib import Path

from mls.files import atomic_write

BASELINE = "mocov2"
SCORES = {"val_map": "val mAP", "val_knn_map": "val k-NN mAP", "precision": "neighbour precision",
          "test_map": "test mAP", "test_knn_map": "test k-NN mAP"}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else float("nan")


def _cell(values: list[float], digits: int = 1) -> str:
    if not values:
        return "–"
    mean, std = _mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if not math.isnan(std) else f"{mean:.{digits}f}"


def reference(variant: str, variants) -> str:
    """The MoCo-v2 a variant is paired with: ``mocov2_<name>`` where the grid has one for the variant's name or
    the start of it before an underscore (a control with the variant's own MoCo-side settings, such as the
    queue grid's MoCo-v2 at the same D, or the health grid's MoCo-v2 at the paper's m and dz for ``paper`` and
    ``paper_warmup``), else ``mocov2``."""
    parts = variant.split("_")
    for n in range(len(parts), 0, -1):
        control = f"{BASELINE}_{'_'.join(parts[:n])}"
        if control in variants and control != variant:
            return control
    return BASELINE


def summarise_cells(results: dict, index: dict[str, dict[int, str]]) -> list[dict]:
    """Per variant: the scores of each seed, and the paired differences to its MoCo-v2 (``reference``) of
    the same seed.

    ``index`` maps each variant of the grid to its cells' keys by seed: results.json may hold other grids
    and budgets, and one cell may serve several variants of the same settings.
    """
    by_variant = {variant: {seed: results["cells"][key]["scores"] for seed, key in keys.items()
                            if key in results["cells"]} for variant, keys in index.items()}
    rows = []
    for variant, seeds in by_variant.items():
        row = {"variant": variant, "reference": reference(variant, index), "seeds": sorted(seeds)}
        base = by_variant.get(row["reference"], {})
        for name in SCORES:
            row[name] = [seeds[s][name] for s in sorted(seeds) if seeds[s].get(name) is not None]
            row[f"diff_{name}"] = [seeds[s][name] - base[s][name] for s in sorted(seeds)
                                   if seeds[s].get(name) is not None and base.get(s, {}).get(name) is not None]
        rows.append(row)
    return rows


def beyond_noise(diffs: list[float]) -> str:
    """Whether the mean paired difference exceeds two standard errors (n >= 2), and in which direction."""
    if len(diffs) < 2:
        return "–"
    mean, std = _mean_std(diffs)
    se = std / math.sqrt(len(diffs))
    if abs(mean) > 2 * se:
        return "yes, better" if mean > 0 else "yes, worse"
    return "no"


def markdown(results: dict, variants: dict[str, dict], index: dict[str, dict[int, str]]) -> str:
    rows = summarise_cells(results, index)
    shown = [name for name in SCORES if any(row[name] for row in rows)]
    paired = [name for name in ("val_map", "test_map") if name in shown]  # the test split's once it is read
    lines = [f"`{results['command']}`", "",
             "| variant | seeds | " + " | ".join(SCORES[n] for n in shown)
             + "".join(f" | Δ {SCORES[n]} vs MoCo-v2 (paired) | beyond 2 SE" for n in paired) + " |",
             "|---|---|" + "---|" * (len(shown) + 2 * len(paired))]
    for row in rows:
        cells = [_cell(row[n], digits=1 if n != "precision" else 3) for n in shown]
        for name in paired:
            baseline = row["variant"] == BASELINE
            cells += ["–", "–"] if baseline else [_cell(row[f"diff_{name}"]), beyond_noise(row[f"diff_{name}"])]
        lines.append(f"| {row['variant']} | {len(row['seeds'])} | " + " | ".join(cells) + " |")
    lines += ["", "Variants (options over the budget's settings):", ""]
    lines += [f"- `{v}`: " + (", ".join(f"{k}={val}" for k, val in options.items()) or "the budget's MLS")
              for v, options in variants.items()]
    controls = [f"`{row['variant']}` to `{row['reference']}`" for row in rows if row["reference"] != BASELINE]
    lines += ["", "mAP in %, mean ± std over pretraining seeds; Δ is each seed's difference to MoCo-v2 pretrained "
                  "with the same seed" + (f" (to its own control: {', '.join(controls)})" if controls else "")
              + "; 'beyond 2 SE': |mean Δ| > 2 std/√n."]
    return "\n".join(lines) + "\n"


def figure(results: dict, index: dict[str, dict[int, str]], out: Path) -> None:
    """Three panels per variant: the paired difference of validation mAP to MoCo-v2 (bars: two standard
    errors, so a bar clear of zero is a difference beyond noise), then validation mAP and neighbour
    precision (bars: std over seeds)."""
    from mls.viz.curves import agg_figure

    rows = [r for r in summarise_cells(results, index) if r["val_map"]]
    fig = agg_figure(figsize=(5 + 1.5 * len(rows), 3.6))
    axes = fig.subplots(1, 3)
    ticks = range(len(rows)), [r["variant"] for r in rows]
    for name, colour, shift in (("val_map", "tab:red", 0.0), ("test_map", "tab:purple", 0.15)):
        if name == "test_map" and not any(r["diff_test_map"] for r in rows):
            continue  # the test split not read yet
        # no bar without two paired seeds (a variant whose MoCo-v2 control has not run yet has none)
        paired = [r[f"diff_{name}"] if r["variant"] != BASELINE else [] for r in rows]
        diffs = [_mean_std(d) if d else (math.nan, math.nan) for d in paired]
        two_se = [0.0 if math.isnan(s) else 2 * s / math.sqrt(len(d)) for d, (_, s) in zip(paired, diffs)]
        axes[0].errorbar([i + shift for i in ticks[0]], [m for m, _ in diffs], yerr=two_se, fmt="o", capsize=4,
                         color=colour, label=SCORES[name])
    axes[0].axhline(0.0, color="grey", linestyle="--", linewidth=1)
    axes[0].set_ylabel("Δ mAP vs its MoCo-v2, same seed")
    axes[0].legend(loc="best", fontsize=8)
    for ax, name, label in ((axes[1], "val_map", "validation mAP (%)"), (axes[2], "precision", "neighbour precision")):
        stats = [_mean_std(r[name]) if r[name] else (math.nan, 0) for r in rows]
        ax.errorbar(ticks[0], [m for m, _ in stats], yerr=[0 if math.isnan(s) else s for _, s in stats],
                    fmt="o", capsize=4, color="tab:blue")
        base = next((m for r, (m, _) in zip(rows, stats) if r["variant"] == BASELINE), None)
        if base is not None and not math.isnan(base):
            ax.axhline(base, color="grey", linestyle="--", linewidth=1, label="MoCo-v2")
            ax.legend(loc="best", fontsize=8)
        ax.set_ylabel(label)
    for ax in axes:
        ax.set_xticks(*ticks, rotation=35, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{results['command']}\n(bars: 2 SE of the paired Δ; std over seeds)", fontsize=8)
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


# The health measures (mls.method.health) a study draws over steps, one figure each, for every variant whose runs logged them.
HEALTH_FIGURES = {
    "alignment": ("health/alignment", "health/logit_neg"),
    "spread": ("health/mean_norm", "health/uniformity"),
    "rank": ("health/rank_z", "health/rank_g"),
    "forces": ("health/grad_infonce", "health/grad_extra_neg", "health/grad_extra_pos"),
}


HEALTH_TITLES = {
    "health/alignment": "alignment E‖z1 − z2‖² (4: z1 opposite its key)",
    "health/logit_neg": "mean logit p/τ of the extra loss's negatives",
    "health/rank_z": "effective rank (RankMe) of Q_z",
    "health/rank_g": "effective rank (RankMe) of Q_g",
    "health/grad_infonce": "InfoNCE's force on z1 (gradient norm)",
    "health/grad_extra_neg": "extra loss's negative terms: force on z1\n(λ not applied; λ = 0 before the start)",
    "health/grad_extra_pos": "extra loss's positive terms: force on z1\n(λ not applied)",
}


def health_series(results: dict, index: dict[str, dict[int, str]], names) -> dict[str, dict[str, list]]:
    """Per variant and measure: ``[(step, mean over seeds, [value of each seed])]`` from the cells' CSV logs
    (cells whose run folder is gone, or that logged no health, are left out)."""
    from mls.viz.curves import find_metrics, read_metrics

    out: dict[str, dict[str, list]] = {}
    for variant, keys in index.items():
        runs = [Path(results["cells"][key]["run"]) for key in keys.values() if "run" in results["cells"].get(key, {})]
        logs = [read_metrics(*find_metrics(run / "csv")) for run in runs if (run / "csv").is_dir()]
        for name in names:
            per_seed = [dict(log[name]) for log in logs if log.get(name)]
            if not per_seed:
                continue
            steps = sorted(set.intersection(*(set(s) for s in per_seed)))
            out.setdefault(variant, {})[name] = [(x, statistics.fmean(s[x] for s in per_seed), [s[x] for s in per_seed])
                                                  for x in steps]
    return out


def health_figure(results: dict, index: dict[str, dict[int, str]], names, out: Path) -> bool:
    """One panel per measure, one line per variant (the mean over its seeds; thin lines: each seed).
    False (nothing written) when no run logged these measures."""
    series = health_series(results, index, names)
    names = [n for n in names if any(n in s for s in series.values())]
    if not names:
        return False
    from mls.viz.curves import KNOWN, agg_figure

    fig = agg_figure(figsize=(4.6 * len(names), 3.4))
    axes = fig.subplots(1, len(names), squeeze=False)
    for ax, name in zip(axes[0], names):
        for n, (variant, measures) in enumerate(series.items()):
            if name not in measures:
                continue
            xs = [x for x, _, _ in measures[name]]
            colour = f"C{n % 10}"
            ax.plot(xs, [m for _, m, _ in measures[name]], color=colour, label=variant)
            for seed in range(len(measures[name][0][2])):
                ax.plot(xs, [v[seed] for _, _, v in measures[name]], color=colour, alpha=0.25, linewidth=0.7)
        ax.set_title(HEALTH_TITLES.get(name, KNOWN.get(name, name)), fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{results['command']} (thick: mean over seeds; thin: each seed)", fontsize=8)
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return True


def write_outputs(root: Path, results: dict, variants: dict[str, dict], index: dict[str, dict[int, str]]) -> str:
    """Write results.md and results.png (of the grid's variants), and health_*.png where the runs logged the
    health measures, beside results.json; return the Markdown."""
    table = markdown(results, variants, index)
    atomic_write(root / "results.md", lambda tmp: Path(tmp).write_text(table))
    if any(r["val_map"] for r in summarise_cells(results, index)):
        figure(results, index, root / "results.png")
    for name, measures in HEALTH_FIGURES.items():
        health_figure(results, index, measures, root / f"health_{name}.png")
    return table
