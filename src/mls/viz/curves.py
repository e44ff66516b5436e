"""Training curves from a Lightning ``CSVLogger`` ``metrics.csv``: one panel per logged quantity, or per
group of quantities read together (the forces on ``z1``, the logits of positives and negatives, the ranks)."""
from __future__ import annotations

import csv
import math
from pathlib import Path

from mls.files import atomic_write, ensure_writable

# What the trainer logs, in the order the panels appear; other logged columns follow.
KNOWN = {
    "train/loss": "total loss",
    "train/loss_infonce": "InfoNCE loss",
    "train/loss_extra": "extra loss (BCE / BCE-pos / k-NN)",
    "train/pos_sim": "similarity of the selected neighbours",
    "train/queue_fill": "queue fill",
    "train/label_precision": "pseudo-label precision",
    "train/lr": "learning rate",
    "train/images_per_sec": "throughput (images/s)",
    "train/skipped_images": "unreadable images skipped (per epoch)",
    "monitor/knn_top1": "k-NN top-1 on the --monitor labels (%)",
    "monitor/knn_map": "k-NN mAP on the --monitor labels (%)",
    "health/mean_norm": "‖mean(Q_z)‖ (1: all keys alike)",
    "health/uniformity": "uniformity of Q_z (0: collapsed)",
    "health/alignment": "alignment E‖z1 − z2‖²",
    "health/spread_z": "spread of Q_z, √d·std (0: collapsed, 1: even)",
    "health/rank_z": "effective rank (RankMe)",
    "health/grad_infonce": "gradient norm on z1 (λ not applied)",
    "health/logit_pos": "mean logit p/τ of the extra loss",
}
# Quantities drawn in the panel of the first one named, with a legend.
GROUPS = {
    "health/rank_z": ("health/rank_z", "health/rank_g"),
    "health/grad_infonce": ("health/grad_infonce", "health/grad_extra_pos", "health/grad_extra_neg"),
    "health/logit_pos": ("health/logit_pos", "health/logit_neg"),
}
LEGEND = {"health/rank_z": "Q_z", "health/rank_g": "Q_g", "health/grad_infonce": "InfoNCE",
          "health/grad_extra_pos": "extra, positive terms", "health/grad_extra_neg": "extra, negative terms",
          "health/logit_pos": "positives", "health/logit_neg": "negatives"}
AXES = ("step", "epoch")
PANEL_INCHES = (4.0, 3.0)
DPI = 100
PANEL_COLUMNS = 3


def find_metrics(path: str | Path) -> list[Path]:
    """``[path]`` if it is a file, else every ``metrics.csv`` below it, oldest first.

    A run resumed from a checkpoint logs into a new ``version_N`` folder: together, in the
    order they were written, the files give the whole run.
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{str(path)!r} is neither a metrics.csv file nor a log folder")
    found = sorted(path.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no metrics.csv under {str(path)!r}; expected a Lightning CSVLogger folder")
    return found


def read_metrics(*paths: str | Path) -> dict[str, list[tuple[float, float]]]:
    """Series ``{column: [(step, value), ...]}`` of every logged metric, skipping empty cells.

    The x value is ``step`` when logged, else ``epoch``, else the row number. Where several
    files log the same step (a resumed run repeats the steps after its checkpoint), the
    later file wins.
    """
    by_x: dict[str, dict[float, float]] = {}
    for path in paths:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows:
            raise ValueError(f"{str(path)!r} holds no logged rows")
        for n, row in enumerate(rows):
            x = next((float(row[a]) for a in AXES if row.get(a) not in (None, "")), float(n))
            for name, cell in row.items():
                if name in AXES or name is None or cell in (None, ""):
                    continue
                try:
                    by_x.setdefault(name, {})[x] = float(cell)
                except ValueError:
                    continue
    return {name: sorted(points.items()) for name, points in by_x.items()}


def panel_order(names: list[str]) -> list[list[str]]:
    """The panels, each a list of the logged columns it draws: known quantities first, in the trainer's
    order (a group of ``GROUPS`` in one panel), then any other logged column alphabetically."""
    grouped = {member: lead for lead, members in GROUPS.items() for member in members}
    panels: dict[str, list[str]] = {}
    for name in [n for n in KNOWN if n in names or n in GROUPS] + sorted(n for n in names if n not in KNOWN):
        lead = grouped.get(name, name)
        members = [m for m in GROUPS.get(lead, (lead,)) if m in names]
        if members and lead not in panels:
            panels[lead] = members
    return list(panels.values())


def agg_figure(**options):
    """A matplotlib ``Figure`` drawn by the Agg canvas (``options``: ``figsize``, ``dpi``): no pyplot, so no
    global backend chosen and no figure left open."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(**options)
    FigureCanvasAgg(figure)
    return figure


def plot_curves(metrics: str | Path, out: str | Path, columns: int = PANEL_COLUMNS) -> list[str]:
    """Draw one panel per logged quantity and save the figure; return the plotted column names.

    Each panel is ``PANEL_INCHES`` at ``DPI``, so the image is ``columns`` x rows panels in size.
    """
    ensure_writable(out)
    paths = find_metrics(metrics)
    series = read_metrics(*paths)
    panels = panel_order(list(series))
    if not panels:
        raise ValueError(f"{str(paths[-1])!r} has no metric columns besides {', '.join(AXES)}")
    columns = min(columns, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig = agg_figure(figsize=(PANEL_INCHES[0] * columns, PANEL_INCHES[1] * rows), dpi=DPI)
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax, members in zip(axes.flat, panels):
        for name in members:
            xs, ys = zip(*series[name])
            ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=LEGEND.get(name, name))
        if len(members) > 1:
            ax.legend(fontsize=8)
        ax.set_title(KNOWN.get(members[0], members[0]), fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if members[0] == "train/lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=DPI, format=Path(out).suffix.lstrip(".") or "png"))
    return [name for members in panels for name in members]


def plot(metrics: str, out: str = "curves.png") -> None:
    """Plot training curves (losses, lr, throughput, pseudo-label precision, --monitor score, health) from a CSV log.

    Args:
        metrics: A Lightning ``metrics.csv``, or a log folder: all its metrics.csv files, joined in time order.
        out: Output image (``.png``, ``.pdf``, ``.svg``).
    """
    names = plot_curves(metrics, out)
    print(f"plotted {len(names)} quantities ({', '.join(names)}) to {out}")
