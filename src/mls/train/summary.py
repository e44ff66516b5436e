"""The lines a finished run ends with: where it stopped, its last epoch's loss terms and pseudo-label
precision, the health watch's verdict, where the files are, and the commands that look at the result."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from mls.loggers import log_places
from mls.method.extra_losses import EXTRA_LOSSES
from mls.train.console import health_watch
from mls.train.monitor import BEST, LabelMonitor
from mls.train.resume import CHECKPOINTS
from mls.train.run_record import CONFIG
from mls.train.settings import PretrainSettings


def last_epoch_means(metrics_csv: Path) -> tuple[int | None, dict[str, float]]:
    """The last epoch logged in a CSVLogger file and the mean of each ``train/`` quantity over its steps."""
    if not metrics_csv.is_file():
        return None, {}
    with open(metrics_csv) as f:
        rows = [row for row in csv.DictReader(f) if row.get("epoch") not in (None, "")]
    if not rows:
        return None, {}
    epoch = rows[-1]["epoch"]
    values: dict[str, list[float]] = {}
    for row in rows:
        if row["epoch"] == epoch and row.get("train/images_per_sec"):  # a training step (not an epoch-end row)
            for key, text in row.items():
                if key.startswith("train/") and text not in ("", None) and not math.isnan(float(text)):
                    values.setdefault(key[len("train/"):], []).append(float(text))
    return int(epoch), {key: sum(v) / len(v) for key, v in values.items()}


def monitor_scores(csv_root: Path, metric: str) -> dict[int, float]:
    """The ``--monitor`` score of each epoch it was logged in, from every ``metrics.csv`` of a run (a resumed run
    logs into a new version folder; a later file wins)."""
    scores = {}
    for path in sorted(csv_root.glob("version_*/metrics.csv"), key=lambda p: p.stat().st_mtime):
        with open(path) as f:
            scores.update({int(row["epoch"]): float(row[metric]) for row in csv.DictReader(f) if row.get(metric)})
    return dict(sorted(scores.items()))


def monitor_line(trainer: L.Trainer, csv_root: Path, out: Path) -> str | None:
    """"monitor: k-NN mAP on ...: 71.3 at epoch 7 (the last), best 72.0 at epoch 5 (best.ckpt); its cost"."""
    monitor = next((c for c in getattr(trainer, "callbacks", []) if isinstance(c, LabelMonitor)), None)
    scores = monitor_scores(csv_root, monitor.labelled.metric) if monitor is not None else {}
    if not scores:
        return None
    last, best = max(scores), max(scores, key=scores.get)  # the first of equal scores, as ModelCheckpoint keeps
    share = monitor.seconds / monitor.run_seconds if monitor.run_seconds else float("nan")
    return (f"monitor: {monitor.labelled.describe()}: {scores[last]:.1f} at epoch {last} (the last), best "
            f"{scores[best]:.1f} at epoch {best} ({out / CHECKPOINTS / BEST}.ckpt); this run's {monitor.passes} "
            f"pass{'' if monitor.passes == 1 else 'es'} took {monitor.seconds:.1f} s, {share:.1%} of its time")


def run_summary(trainer: L.Trainer, settings: PretrainSettings, out: Path, last: Path,
                exported: Path | None = None) -> str:
    """What a finished run ends with: where it stopped, its last epoch's loss terms and pseudo-label
    precision (from the CSV logs, when the run writes them), where the files are (``exported``: the backbone for
    other tools), and the commands that look at the result or repeat the run."""
    csv_dir = next((logger.log_dir for logger in trainer.loggers if isinstance(logger, CSVLogger)), None)
    epoch, means = last_epoch_means(Path(csv_dir) / "metrics.csv") if csv_dir else (None, {})
    lines = [f"done: {trainer.global_step} steps, {trainer.current_epoch} epochs; checkpoint {last}"]
    if means.get("loss") is not None:
        terms = f"loss {means['loss']:.3f} (InfoNCE {means.get('loss_infonce', float('nan')):.3f}"
        if settings.model.method == "mls" and "loss_extra" in means:
            words = EXTRA_LOSSES[settings.model.mls_loss].describe(settings.model)
            terms += f", {words} {means['loss_extra']:.3f} at mean λ {means.get('extra_weight', float('nan')):.2f}"
        terms += ")"
        if "label_precision" in means:
            terms += f", pseudo-label precision {means['label_precision']:.3f} (share of selected neighbours " \
                     "sharing a class with their query)"
        lines.append(f"epoch {epoch} on average: {terms}")
    watch = health_watch(trainer)
    if watch is not None:
        lines.append(watch.verdict)
    monitored = monitor_line(trainer, Path(csv_dir).parent, out) if csv_dir else None
    if monitored is not None:
        lines.append(monitored)
    places = log_places(trainer.loggers)
    lines.append("logs: " + " and ".join(filter(None, [", ".join(places[:-1]), *places[-1:]])))
    lines.append(f"settings: {out / CONFIG} (mls pretrain --config {out / CONFIG} --out OTHER runs the same again)")
    if exported is not None:
        lines.append(f"backbone: {exported} (safetensors, named as torchvision and timm name it; mls export for "
                     "ONNX or detectron2)")
    evaluate = (f"mls eval knn --weights {last}" if settings.train.data is None
                else f"mls eval linear --weights {last} --dataset voc07 --data VOC2007_ROOT")
    lines += ["next:",
              f"  mls visualize neighbors --checkpoint {last} --out neighbors.png",
              f"  {evaluate}"]
    if csv_dir:
        lines.append(f"  mls plot {out} --out curves.png")
    lines += [f"  tensorboard --logdir {Path(logger.log_dir)}" for logger in trainer.loggers
              if isinstance(logger, TensorBoardLogger)]
    return "\n".join(lines)
