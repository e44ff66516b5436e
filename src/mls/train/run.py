"""``mls pretrain``: settings → data → model → trainer, each built by a function of its own.

The options of ``pretrain`` are the fields of ``MLSConfig``, ``ViewConfig`` and ``TrainConfig``
(``mls.train.config.SETTINGS``), exposed flat (``--topk``, ``--hue``, ``--batch-size``): a new
setting is declared once, in its dataclass, and appears here, in ``--help``, in the YAML configs
and in the checkpoint.
"""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info

import mls
from mls.checkpoint import atomic_save
from mls.options import flat_options
from mls.train.config import PRESET_HELP, PRESETS, SETTINGS, PretrainSettings
from mls.train.data import PretrainData
from mls.train.module import PretrainModule

CHECKPOINTS = "checkpoints"
INTERRUPTED = "interrupted"
# Lightning warnings that do not apply to these runs: `resolve_resume` picks the checkpoint (with
# OnExceptionCheckpoint, Lightning goes looking for a "last" one on every fresh fit), and the sampler
# goes on mid-epoch from the restored step (mls.train.data), which Lightning cannot see.
_NOT_APPLICABLE = (
    r"`\.fit\(ckpt_path=None\)` was called without a model",
    r'\.fit\(ckpt_path="last"\) is set, but there is no last checkpoint',
    r"You're resuming from a checkpoint that ended before the epoch ended",
)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints go to a temporary file that is renamed over the old one: a crash never leaves half a file."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        atomic_save(checkpoint, path)


def _progress(path: Path) -> tuple[int, float]:
    """(training step, modification time) of a checkpoint, read without loading its tensors."""
    step = torch.load(path, map_location="cpu", weights_only=False, mmap=True).get("global_step", -1)
    return step, path.stat().st_mtime


def resolve_resume(resume: str | None, out: Path) -> str | None:
    """``auto``: whichever of ``last.ckpt`` and ``interrupted.ckpt`` in ``out`` got furthest (none: start
    afresh); else the path given. A run that failed before it restored its checkpoint writes an
    ``interrupted.ckpt`` of step 0, which must not win over an older ``last.ckpt``."""
    if resume is None:
        return None
    if resume == "auto":
        found = [p for p in (out / CHECKPOINTS / "last.ckpt", out / CHECKPOINTS / f"{INTERRUPTED}.ckpt") if p.is_file()]
        return str(max(found, key=_progress)) if found else None
    if not Path(resume).is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {resume}")
    return resume


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
                        t.loader_workers, t.seed, settings.view.transform())


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
            OnExceptionCheckpoint(out / CHECKPOINTS, filename=INTERRUPTED),
            TQDMProgressBar(refresh_rate=max(1, train.log_every // 2)),
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
             preset: Literal["auto", "demo", "paper"] = "auto", **options) -> Path:
    """Pretrain a backbone with MLS (or MoCo-v2) and write checkpoints and logs under OUT.

    Settings left out come from a preset: on the built-in scenes (no --data) the CPU demo's
    (configs/demo_cpu.yaml: ResNet-18 at 64 px, 8 epochs, about 4 minutes on 2 cores), with
    --data the main paper's (ResNet-50 at 224 px, D 4,096, λ 0.5, m 0.995, dz 256, MoCo-v2's views).
    Each option's help gives the paper's default and, where it differs, the demo's.
    """
    settings = PretrainSettings.resolve(options, preset)
    out_dir = Path(out or ("runs/demo" if settings.preset == "demo" else "runs/pretrain"))
    L.seed_everything(settings.train.seed, workers=True, verbose=False)
    data = build_data(settings)
    ckpt_path = resolve_resume(resume, out_dir)
    written = sorted(p.name for p in (out_dir / CHECKPOINTS).glob("*.ckpt"))
    if written and ckpt_path is None:
        raise FileExistsError(f"{out_dir} already holds the checkpoints of a run ({', '.join(written[:4])}): "
                              "pass --resume auto to continue it, or choose another --out")
    trainer = build_trainer(settings.train, out_dir)
    module = build_module(settings, data, trainer.world_size)
    rank_zero_info(f"mls pretrain: preset '{settings.preset}' ({PRESET_HELP[settings.preset]}), writing to {out_dir}")
    with warnings.catch_warnings():
        for message in _NOT_APPLICABLE:
            warnings.filterwarnings("ignore", message=message)
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    last = out_dir / CHECKPOINTS / "last.ckpt"
    rank_zero_info(f"checkpoint: {last}\nlogs: {trainer.loggers[1].log_dir}/metrics.csv and {out_dir / 'tensorboard'} "
                   f"(mls plot {out_dir / 'csv'} --out curves.png; tensorboard --logdir {out_dir / 'tensorboard'})")
    return last


def _describe(f) -> str:
    """An option's help: its doc, the paper's default and, where it differs, the demo's value."""
    demo = PRESETS["demo"].get(f.name, f.default)
    return f"{f.metadata['doc']} [paper: {f.default}" + (f"; demo: {demo}]" if demo != f.default else "]")


pretrain.__doc__ += """
    Args:
        out: output folder: checkpoints/, tensorboard/ and csv/ logs (default: runs/demo, or runs/pretrain with --data).
        resume: checkpoint to resume from, or "auto": the one in OUT that got furthest (a fresh run into an OUT
            holding checkpoints is refused).
        preset: where unset options come from: auto (demo without --data, else paper), """ + ", ".join(
    f"{name} ({text})" for name, text in PRESET_HELP.items()) + "."
pretrain = flat_options(pretrain, SETTINGS, unset_is_none=True, describe=_describe)
