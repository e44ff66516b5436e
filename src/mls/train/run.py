"""``mls pretrain``: settings → data → model → trainer, each built by a function of its own.

The options of ``pretrain`` are the fields of ``MLSConfig``, ``ViewConfig`` and ``TrainConfig``
(``mls.train.config.SETTINGS``), taken flat (``topk=5``, ``--hue``, ``--batch-size``): a new setting
is declared once, in its dataclass, and appears in ``--help``, in the YAML configs and in the
checkpoint; ``PretrainOptions`` (mls.train.options), which types ``pretrain``'s keywords for editors,
is written from the dataclasses. ``pretrain_command`` gives ``mls pretrain`` its parser's view of
``pretrain``: one documented keyword per option. Importing this module only defines things.
"""
from __future__ import annotations

import csv
import dataclasses
import inspect
import logging
import math
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info

from mls.checkpoints.pretrained import UnreadableCheckpoint, atomic_save, is_pretraining_checkpoint, read_checkpoint
from mls.command_options import flat_options
from mls.files import CheckpointNotWritten, ensure_writable_folder
from mls.train.config import PRESET_HELP, PRESETS, SETTINGS, PretrainSettings
from mls.train.data import PretrainData
from mls.train.module import PretrainModule
from mls.train.options import PretrainOptions
from mls.train.watch import HealthWatch

if sys.version_info >= (3, 11):
    from typing import Unpack
else:  # typing_extensions comes with torch (and Lightning), which require it
    from typing_extensions import Unpack

CHECKPOINTS = "checkpoints"
INTERRUPTED = "interrupted"
# Lightning warnings that do not apply to these runs: `resolve_resume` picks the checkpoint (with
# OnExceptionCheckpoint, Lightning goes looking for a "last" one on every fresh fit), and the sampler
# goes on mid-epoch from the restored step (mls.train.data), which Lightning cannot see.
_NOT_APPLICABLE = (
    r"`\.fit\(ckpt_path=None\)` was called without a model",
    r'\.fit\(ckpt_path="last"\) is set, but there is no last checkpoint',
    r"You're resuming from a checkpoint that ended before the epoch ended",
    # a resumed run writes into its own checkpoint folder (a fresh run into a full one is refused)
    r"Checkpoint directory .* exists and is not empty",
)
# Warnings about Lightning's and torch's own code, which no setting of a run can act on:
_INTERNAL = (
    # torch 2.6+ asks callers of torch.load to choose weights_only; Lightning's checkpoint loading
    # (checkpoints this run wrote itself, holding its optimiser and loop state) does not yet
    (r".*weights_only.*", FutureWarning),
    # Lightning's own pytree helper uses torch's deprecated LeafSpec check
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
)


class _NoTips(logging.Filter):
    """Drops Lightning's "💡 Tip:" adverts for its cloud services (litlogger, litmodels) from a run's output."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


_LIGHTNING_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


def quiet_lightning_tips() -> None:
    """Install ``_NoTips`` on Lightning's loggers, once: called when a run starts, never at import."""
    for name in _LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoTips) for f in logger.filters):
            logger.addFilter(_NoTips())


class ProgressBar(TQDMProgressBar):
    """Lightning's progress bar without ``v_num``, the logger's version folder, which says nothing about
    training, and with what ``HealthWatch`` reports (``health=...``) once it has reported something."""

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        watch = health_watch(trainer)
        if watch is not None and watch.status is not None:
            metrics["health"] = watch.status
        return metrics


def health_watch(trainer: L.Trainer) -> HealthWatch | None:
    """The run's ``HealthWatch``, or None."""
    return next((c for c in getattr(trainer, "callbacks", []) if isinstance(c, HealthWatch)), None)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints go to a temporary file that is synced and renamed over the old one: a crash, a kill or
    a full disk never leaves half a file, and a failed write stops the run with ``CheckpointNotWritten``."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        try:
            atomic_save(checkpoint, path)
        except OSError as error:
            raise CheckpointNotWritten(path, error) from error


class InterruptedCheckpoint(OnExceptionCheckpoint):
    """``interrupted.ckpt`` on a crash or a signal once the run has trained past where it started. Not
    before (a run refused or failing while it sets up has nothing new to keep, and a write would replace
    the checkpoint it resumed from with its own, possibly refused, settings), nor when writing a checkpoint
    is what failed (another write would fail the same way and hide the first error)."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.first_step = trainer.global_step

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        started = getattr(self, "first_step", None)
        trained = started is not None and trainer.global_step > started
        if trained and not isinstance(exception, CheckpointNotWritten):
            super().on_exception(trainer, pl_module, exception)


def _progress(path: Path) -> tuple[int, float]:
    """(training step, modification time) of a checkpoint, read without loading its tensors."""
    ckpt = read_checkpoint(path, mmap=True)
    step = ckpt.get("global_step", -1) if isinstance(ckpt, dict) else -1
    return step, path.stat().st_mtime


def resolve_resume(resume: str | None, out: Path) -> str | None:
    """``auto``: whichever of ``last.ckpt``, ``interrupted.ckpt`` and ``epochNNN.ckpt`` in ``out`` got
    furthest (none: start afresh); else the path given. A run that failed before it restored its
    checkpoint wrote an ``interrupted.ckpt`` of step 0 before mls 0.7, which must not win over an older ``last.ckpt``.
    A file that cannot be read (damaged by a full disk or a copy) is skipped, with one line saying so."""
    if resume is None:
        return None
    if resume == "auto":
        folder = out / CHECKPOINTS
        found = [p for p in (folder / "last.ckpt", folder / f"{INTERRUPTED}.ckpt") if p.is_file()]
        found += sorted(folder.glob("epoch[0-9]*.ckpt"))
        progress, skipped = {}, []
        for path in found:
            try:
                progress[path] = _progress(path)
            except UnreadableCheckpoint as error:
                skipped.append(str(error))
                rank_zero_info(f"--resume auto: skipping {error.path}: {error.reason}")
        if found and not progress:
            raise ValueError(f"--resume auto: none of the {len(found)} checkpoints in {folder} can be read "
                             f"({skipped[0]}); resume from a copy with --resume PATH, or start anew with another --out")
        return str(max(progress, key=progress.get)) if progress else None
    if not Path(resume).is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {resume}")
    return resume


def check_resumable(path: str, data: dict) -> None:
    """Before Lightning starts: ``path`` must be a full training checkpoint of ``mls pretrain`` (not
    exported weights), made on the same data (when its data fingerprint is known: not before mls 0.3)."""
    ckpt = read_checkpoint(path, mmap=True)
    if not is_pretraining_checkpoint(ckpt):
        raise ValueError(f"--resume {path} is not a checkpoint of `mls pretrain` (no model hyper-parameters)")
    if "optimizer_states" not in ckpt or "global_step" not in ckpt:
        raise ValueError(f"--resume {path} holds the model but not the training state (optimiser, step) that "
                         "resuming needs; start a new run, or export or evaluate it instead")
    stored = (ckpt["hyper_parameters"].get("data") or {}).get("fingerprint")
    if stored is not None and stored != data.get("fingerprint"):
        raise ValueError(f"--resume {path} was pretrained on other data: {stored}, but this run's data is "
                         f"{data.get('fingerprint')}; pass the same --data (or --num-images, --image-size and "
                         "--seed of the built-in scenes), or start a new run with another --out")


def check_settings(n_images: int, batch_size: int, world_size: int, queue_size: int) -> None:
    """Settings that cannot work with this data, said in plain words before anything starts."""
    if batch_size * world_size > n_images:
        raise ValueError(f"batch_size={batch_size} x {world_size} ranks is larger than the data set "
                         f"({n_images} images): no full batch can be made")
    if queue_size >= n_images:
        raise ValueError(
            f"queue_size={queue_size} is not below the number of images ({n_images}): the queue would hold "
            "keys of the very image being queried, which InfoNCE then treats as negatives. "
            "Use a smaller --queue-size (MoCo: well below the data set) or more images.")


def build_data(settings: PretrainSettings) -> PretrainData:
    """The images (a folder, or the built-in scenes) as seeded pairs of MoCo-v2 views."""
    t = settings.train
    return PretrainData(t.data, t.annotations, t.num_images, settings.view.image_size, t.batch_size,
                        t.loader_workers, t.seed, settings.view.transform(), augment_on=t.views_on)


def build_trainer(train, out: Path) -> L.Trainer:
    """Lightning's trainer: DDP without buffer broadcasting on several devices, atomic checkpoints, logs."""
    multi = train.devices not in (1, "1") or train.num_nodes > 1 or train.strategy == "ddp"
    strategy = DDPStrategy(broadcast_buffers=False) if multi and train.strategy in ("auto", "ddp") else train.strategy
    return L.Trainer(
        accelerator="auto",
        devices=train.devices,
        num_nodes=train.num_nodes,
        strategy=strategy,
        precision=train.precision,
        sync_batchnorm=train.sync_bn,
        max_epochs=train.epochs,
        max_steps=train.max_steps,
        use_distributed_sampler=False,
        log_every_n_steps=train.log_every,
        plugins=[AtomicCheckpointIO()],
        callbacks=[
            ModelCheckpoint(out / CHECKPOINTS, filename="epoch{epoch:03d}", auto_insert_metric_name=False,
                            every_n_epochs=train.save_every, save_top_k=-1, save_last=True),
            InterruptedCheckpoint(out / CHECKPOINTS, filename=INTERRUPTED),
            ProgressBar(refresh_rate=max(1, train.log_every // 2)),
            HealthWatch(train.on_collapse),
        ],
        # CSV: one version_N folder per (resumed) run, since Lightning's CSV writer starts its file anew
        logger=[TensorBoardLogger(out, name="tensorboard", version=""), CSVLogger(out, name="csv")],
        enable_model_summary=False,
        benchmark=torch.cuda.is_available(),
        default_root_dir=out,
    )


def build_module(settings: PretrainSettings, data: PretrainData, world_size: int) -> PretrainModule:
    """The ``MLS`` model in its Lightning module, with the schedule spanning every epoch of the run."""
    t = settings.train
    check_settings(len(data.source), t.batch_size, world_size, settings.model.queue_size)
    return PretrainModule(
        model=dataclasses.asdict(settings.model),
        train=dataclasses.asdict(t),
        view=dataclasses.asdict(settings.view),
        steps_per_epoch=len(data.source) // world_size // t.batch_size,
        total_batch=t.batch_size * world_size,
        data=data.describe(),
        labels=data.labels(),
    )


def pretrain(out: str | None = None, resume: str | None = None,
             preset: Literal["auto", "demo", "recommended", "paper"] = "auto",
             **options: Unpack[PretrainOptions]) -> Path:
    """Pretrain a backbone with MLS (or MoCo-v2) and write checkpoints and logs under OUT.

    Settings left out come from a preset: on the built-in scenes (no --data) the CPU demo's
    (configs/demo_cpu.yaml: ResNet-18 at 64 px, 8 epochs, a few minutes on 2 cores); with --data the
    recommended one: the main paper's (ResNet-50 at 224 px, D 4,096, k 20, m 0.995, dz 256, MoCo-v2's
    views) with the extra loss balanced, at λ 0.25, from epoch 2, since the paper's Eq. 9 from the first
    step fell 16-26 mAP behind MoCo-v2 at every budget measured (8-32 epochs; docs/study/health), where
    this one was level with it. --preset paper runs the paper's setting as published.
    Each option's help gives the paper's default and, where they differ, the recommended and demo values.

    Args:
        out: output folder: checkpoints/, tensorboard/ and csv/ logs (default: runs/demo, or runs/pretrain with --data).
        resume: checkpoint to resume from, or "auto": the one in OUT that got furthest (a fresh run into an OUT
            holding checkpoints is refused).
        preset: where unset options come from: auto (demo without --data, else recommended), demo, recommended
            or paper (``PRESET_HELP`` in mls.train.config says what each holds).
        **options: the settings by name (``epochs=1``, ``topk=5``), each a field of ``MLSConfig``, ``ViewConfig``
            or ``TrainConfig`` with its doc (``PretrainOptions`` lists them; ``mls pretrain --help`` shows them
            with each preset's value); left out or None: the preset's value. An unknown name is a ValueError.
    """
    settings = PretrainSettings.resolve(options, preset)
    quiet_lightning_tips()
    out_dir = Path(out or ("runs/demo" if settings.preset == "demo" else "runs/pretrain"))
    L.seed_everything(settings.train.seed, workers=True, verbose=False)
    data = build_data(settings)
    ckpt_path = resolve_resume(resume, out_dir)
    if ckpt_path is not None:
        check_resumable(ckpt_path, data.describe())
    written = sorted(p.name for p in (out_dir / CHECKPOINTS).glob("*.ckpt"))
    if written and ckpt_path is None:
        raise FileExistsError(f"{out_dir} already holds the checkpoints of a run ({', '.join(written[:4])}): "
                              "pass --resume auto to continue it, or choose another --out")
    # before Lightning prints anything: what one process can already tell (build_module checks all ranks)
    check_settings(len(data.source), settings.train.batch_size, 1, settings.model.queue_size)
    ensure_writable_folder(out_dir)  # the last check before the run's first line: a refused run leaves no folder
    rank_zero_info(f"mls pretrain: preset '{settings.preset}' ({PRESET_HELP[settings.preset]}); "
                   f"{settings.summary()}; writing to {out_dir}")
    trainer = build_trainer(settings.train, out_dir)
    module = build_module(settings, data, trainer.world_size)
    with warnings.catch_warnings():
        for message in _NOT_APPLICABLE:
            warnings.filterwarnings("ignore", message=message)
        for message, category in _INTERNAL:
            warnings.filterwarnings("ignore", message=message, category=category)
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    last = out_dir / CHECKPOINTS / "last.ckpt"
    rank_zero_info(run_summary(trainer, settings, out_dir, last))
    return last


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


def run_summary(trainer: L.Trainer, settings: PretrainSettings, out: Path, last: Path) -> str:
    """What a finished run ends with: where it stopped, its last epoch's loss terms and pseudo-label
    precision, where the files are, and the commands that look at the result."""
    csv_dir = next(logger.log_dir for logger in trainer.loggers if isinstance(logger, CSVLogger))
    epoch, means = last_epoch_means(Path(csv_dir) / "metrics.csv")
    lines = [f"done: {trainer.global_step} steps, {trainer.current_epoch} epochs; checkpoint {last}"]
    if means.get("loss") is not None:
        terms = f"loss {means['loss']:.3f} (InfoNCE {means.get('loss_infonce', float('nan')):.3f}"
        if settings.model.method == "mls" and "loss_extra" in means:
            terms += f", extra {means['loss_extra']:.3f} at mean λ {means.get('extra_weight', float('nan')):.2f}"
        terms += ")"
        if "label_precision" in means:
            terms += f", pseudo-label precision {means['label_precision']:.3f} (share of selected neighbours " \
                     "sharing a class with their query)"
        lines.append(f"epoch {epoch} on average: {terms}")
    watch = health_watch(trainer)
    if watch is not None:
        lines.append(watch.verdict)
    lines.append(f"logs: {csv_dir}/metrics.csv and {out / 'tensorboard'}")
    evaluate = (f"mls eval knn --weights {last}" if settings.train.data is None
                else f"mls eval linear --weights {last} --dataset voc07 --data VOC2007_ROOT")
    lines += ["next:",
              f"  mls visualize neighbors --checkpoint {last} --out neighbors.png",
              f"  {evaluate}",
              f"  mls plot {out} --out curves.png",
              f"  tensorboard --logdir {out / 'tensorboard'}"]
    return "\n".join(lines)


def _describe(f) -> str:
    """An option's help: its doc, the paper's default and, where they differ, the recommended and demo values."""
    others = [(name, PRESETS[name].get(f.name, f.default)) for name in ("recommended", "demo")]
    return f"{f.metadata['doc']} [paper: {f.default}" + "".join(
        f"; {name}: {value}" for name, value in others if value != f.default) + "]"


def pretrain_command() -> Callable[..., Path]:
    """``pretrain`` as ``mls pretrain`` parses it: a new function each call, with one keyword-only parameter
    per setting (``flat_options``: default None, documented by ``_describe``) and the presets described in
    ``preset``'s help. ``pretrain`` itself is left as it is defined."""
    def command(out: str | None = None, resume: str | None = None,
                preset: Literal["auto", "demo", "recommended", "paper"] = "auto", **options) -> Path:
        return pretrain(out, resume, preset, **options)

    presets = ", ".join(f"{name} ({text})" for name, text in PRESET_HELP.items())
    doc = inspect.cleandoc(pretrain.__doc__).split("\n    preset:")[0]  # its Args end with preset, **options
    command.__doc__ = f"{doc}\n    preset: where unset options come from: auto (demo without --data, else " \
                      f"recommended), {presets}.\n"
    return flat_options(command, SETTINGS, unset_is_none=True, describe=_describe)
