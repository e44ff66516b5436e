"""``pretrain()``: settings → data → model → trainer, each built by a function of its own, then fitted.

The options of ``pretrain`` are the fields of ``MLSConfig``, ``ViewConfig`` and ``TrainConfig``
(``mls.train.settings.SETTINGS``), taken flat (``topk=5``, ``--hue``, ``--batch-size``): a new setting
is declared once, in its dataclass, and appears in ``--help``, in the YAML configs and in the
checkpoint; ``PretrainOptions`` (mls.train.pretrain_options), which types ``pretrain``'s keywords for editors,
is written from the dataclasses. Which checkpoint a run goes on from is ``mls.train.resume``'s; the lines it
ends with, ``mls.train.summary``'s; ``mls pretrain``'s parser, ``mls.train.commands``'. Importing this module
only defines things.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info

from mls.files import ensure_writable_folder
from mls.loggers import build_loggers, require_logger_packages
from mls.train.console import lightning_warnings_left_out, pretrain_progress, quiet_lightning_tips
from mls.train.data_module import PretrainData
from mls.train.module import PretrainModule
from mls.train.monitor import monitor_callbacks, open_monitor
from mls.train.pretrain_options import PretrainOptions
from mls.train.resume import check_resumable, checkpoint_callbacks, last_checkpoint, start_point, trainer_plugins
from mls.train.run_record import export_run_backbone, write_config
from mls.train.settings import PretrainSettings, TrainConfig
from mls.train.summary import run_summary
from mls.train.watch import HealthWatch

if sys.version_info >= (3, 11):
    from typing import Unpack
else:  # typing_extensions comes with torch (and Lightning), which require it
    from typing_extensions import Unpack


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


def planned_world_size(train: TrainConfig) -> int:
    """The ranks the run will have, before Lightning starts: ``num_nodes`` x the devices ``devices`` names (a
    count, device ids such as "0,1", or "auto" / -1: every GPU, else one process)."""
    devices = train.devices
    text = str(devices).strip().strip("[]")
    if text in ("auto", "-1"):
        count = torch.cuda.device_count() or 1
    elif isinstance(devices, str) and "," in text:
        count = len([d for d in text.split(",") if d.strip()])
    else:
        count = int(text)
    return count * train.num_nodes


def build_data(settings: PretrainSettings) -> PretrainData:
    """The images (a folder, or the built-in scenes) as seeded pairs of MoCo-v2 views."""
    t = settings.train
    return PretrainData(t.data, t.annotations, t.num_images, settings.view.image_size, t.batch_size,
                        t.loader_workers, t.seed, settings.view.transform(), augment_on=t.views_on)


def build_monitor(settings: PretrainSettings, out: Path) -> list[Callback]:
    """The ``--monitor`` score and the checkpoint of its best (none without ``monitor`` or with ``monitor_every``
    0); its data is read and checked here, before the run starts."""
    t = settings.train
    if t.monitor is None or t.monitor_every == 0:
        return []
    labelled = open_monitor(t.monitor, settings.view.image_size, t.monitor_images, t.monitor_split)
    return monitor_callbacks(labelled, t.monitor_every, settings.view.image_size, t.batch_size, t.loader_workers, out)


def build_trainer(train: TrainConfig, out: Path, callbacks: Sequence[Callback] = ()) -> L.Trainer:
    """Lightning's trainer: DDP without buffer broadcasting on several devices, atomic checkpoints (under SLURM
    without Lightning's own requeue: ``trainer_plugins``), logs (the module's hyperparameters, the run's settings,
    logged by Lightning), progress as ``train.progress`` chooses; ``callbacks`` besides (``build_monitor``'s)."""
    progress = pretrain_progress(train.progress, refresh_rate=max(1, train.log_every // 2))
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
        plugins=trainer_plugins(),
        callbacks=[*checkpoint_callbacks(out, train.save_every), *progress, HealthWatch(train.on_collapse), *callbacks],
        enable_progress_bar=bool(progress),
        # CSV: one version_N folder per (resumed) run, since Lightning's CSV writer starts its file anew
        logger=build_loggers(train.logger, out, train.project, train.run_name),
        enable_model_summary=False,
        benchmark=torch.cuda.is_available(),
        default_root_dir=out,
    )


def build_module(settings: PretrainSettings, data: PretrainData, world_size: int,
                 described: dict | None = None) -> PretrainModule:
    """The ``MLS`` model in its Lightning module, with the schedule spanning every epoch of the run;
    ``described`` is ``data.describe()`` where the caller has it."""
    batch = settings.train.batch_size
    return PretrainModule(settings, steps_per_epoch=len(data.source) // world_size // batch,
                          total_batch=batch * world_size, data=described or data.describe(), labels=data.labels())


def pretrain(out: str | None = None, resume: str | None = None,
             preset: Literal["auto", "demo", "recommended", "paper"] = "auto",
             **options: Unpack[PretrainOptions]) -> Path:
    """Pretrain a backbone with MLS (or MoCo-v2) and write checkpoints and logs under OUT.

    Settings left out come from a preset: on the built-in scenes (no --data) the CPU demo's
    (configs/demo_cpu.yaml: ResNet-18 at 64 px, 8 epochs, a few minutes on 2 cores); with --data the
    recommended one: the main paper's (ResNet-50 at 224 px, D 4,096, k 20, m 0.995, dz 256, MoCo-v2's
    views) with the extra loss balanced, at λ 0.25, from epoch 2. --preset paper runs the paper's setting as
    published. Which to use: at the budgets this project measured (8 and 32 epochs, ResNet-18, three seeds;
    README, "Which to use"), MoCo-v2 (--method mocov2) was as good and cheaper; recommended is the MLS setting
    that did no harm there (level with MoCo-v2 at the same settings); paper reproduces the publication.
    Each option's help gives the paper's default and, where they differ, the recommended and demo values.

    Args:
        out: output folder: checkpoints/ and the logs, tensorboard/ and csv/ by default (default: runs/demo, or
            runs/pretrain with --data).
        resume: checkpoint to resume from, or "auto": the one in OUT that got furthest (a fresh run into an OUT
            holding checkpoints is refused).
        preset: where unset options come from: auto (demo without --data, else recommended), demo, recommended
            or paper (``PRESET_HELP`` in mls.train.settings says what each holds).
        **options: the settings by name (``epochs=1``, ``topk=5``), each a field of ``MLSConfig``, ``ViewConfig``
            or ``TrainConfig`` with its doc (``PretrainOptions`` lists them; ``mls pretrain --help`` shows them
            with each preset's value); left out or None: the preset's value. An unknown name is a ValueError.
    """
    settings = PretrainSettings.resolve(options, preset)
    require_logger_packages(settings.train.logger)
    quiet_lightning_tips()
    out_dir = Path(out or ("runs/demo" if settings.preset == "demo" else "runs/pretrain"))
    L.seed_everything(settings.train.seed, workers=True, verbose=False)
    data = build_data(settings)
    described = data.describe()
    ckpt_path = start_point(resume, out_dir, partial(check_resumable, data=described))
    # before Lightning prints anything, for every rank the run will have
    world_size = planned_world_size(settings.train)
    check_settings(len(data.source), settings.train.batch_size, world_size, settings.model.queue_size)
    monitor = build_monitor(settings, out_dir)
    ensure_writable_folder(out_dir)  # the last check before the run's first line: a refused run leaves no folder
    rank_zero_info(f"mls pretrain: {settings.preset_line()}; {settings.summary()}; writing to {out_dir}")
    write_config(settings, out_dir)
    trainer = build_trainer(settings.train, out_dir, monitor)
    if trainer.world_size != world_size:  # devices named in a way planned_world_size does not read
        check_settings(len(data.source), settings.train.batch_size, trainer.world_size, settings.model.queue_size)
    module = build_module(settings, data, trainer.world_size, described)
    with lightning_warnings_left_out():
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    last = last_checkpoint(out_dir)
    rank_zero_info(run_summary(trainer, settings, out_dir, last, export_run_backbone(last, out_dir)))
    return last
