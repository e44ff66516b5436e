"""What detection and segmentation fine-tuning share: SGD with its schedule, the Lightning module, the trainer,
the run options, and how a command's options come from its settings dataclasses (``TransferOptions``)."""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import Field, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.loggers import Logger
from torch import nn

from mls.command_options import flat_options, split_options
from mls.loggers import RunLogging, build_loggers
from mls.method.settings import check, field_doc, setting
from mls.progress import progress_callbacks
from mls.train.resume import resume_set_setting, trainer_plugins

LossFn = Callable[[nn.Module, tuple], dict[str, torch.Tensor]]


def warmup_multistep(step: int, warmup_iters: int, steps: Sequence[int], gamma: float = 0.1,
                     warmup_factor: float = 0.001) -> float:
    """detectron2's schedule as a learning-rate factor: linear warm-up from ``warmup_factor``, x gamma at each step."""
    factor = gamma ** sum(step >= s for s in steps)
    if step < warmup_iters:
        alpha = step / warmup_iters
        factor *= warmup_factor * (1 - alpha) + alpha
    return factor


def poly(step: int, max_iters: int, power: float = 0.9, min_ratio: float = 0.0) -> float:
    """mmsegmentation's poly schedule as a factor: (1 - step/max)^power, floored at ``min_ratio`` of the base lr."""
    return (1 - min_ratio) * (1 - min(step, max_iters) / max_iters) ** power + min_ratio


def parameter_groups(model: nn.Module, weight_decay: float, norm_weight_decay: float | None) -> list[dict]:
    """SGD parameter groups: normalisation weights and biases get ``norm_weight_decay`` (detectron2 uses 0)."""
    if norm_weight_decay is None:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    norm_types = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    norm_ids = {id(p) for m in model.modules() if isinstance(m, norm_types) for p in m.parameters(recurse=False)}
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if id(p) not in norm_ids], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) in norm_ids], "weight_decay": norm_weight_decay}]


class TransferModule(L.LightningModule):
    """Fine-tunes a whole model with SGD and a per-iteration schedule; ``loss_fn`` gives its named losses.

    Every module is put in training mode, BatchNorm statistics included (a loaded backbone may come in eval mode).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, lr: float, lr_factor: Callable[[int], float],
                 momentum: float = 0.9, weight_decay: float = 1e-4, norm_weight_decay: float | None = None):
        super().__init__()
        self.model, self.loss_fn, self.lr_factor = model.train(), loss_fn, lr_factor
        self.lr, self.momentum = lr, momentum
        self.weight_decay, self.norm_weight_decay = weight_decay, norm_weight_decay

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        losses = self.loss_fn(self.model, batch)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at step {self.global_step}; lower --lr")
        size = len(batch[0])
        self.log_dict({f"train/{k}": v.detach() for k, v in losses.items()}, batch_size=size)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=size)
        return loss

    def configure_optimizers(self):
        groups = parameter_groups(self.model, self.weight_decay, self.norm_weight_decay)
        optimizer = torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def per_device_batch(batch_size: int, devices: int, num_nodes: int) -> int:
    """The total batch (as in the papers' schedules) split over every process."""
    world = devices * num_nodes
    if batch_size < world or batch_size % world:
        raise ValueError(f"batch_size {batch_size} (total over all GPUs) must be a multiple of "
                         f"devices x num_nodes = {world}")
    return batch_size // world


def make_trainer(out: Path, max_iters: int, accelerator: str = "auto", devices: int = 1, num_nodes: int = 1,
                 strategy: str = "auto", precision: str = "32-true", log_every: int = 20,
                 callbacks: Sequence[L.Callback] = (), loggers: list[Logger] | None = None,
                 progress: str = "auto") -> L.Trainer:
    """An iteration-based trainer; several processes (``torchrun``, ``srun``) use DDP with synchronised BatchNorm.
    Checkpoints are the ``callbacks``' (``mls.train.resume.checkpoint_callbacks``), written atomically. It logs to
    ``loggers`` (default: OUT/metrics.csv) and shows progress as ``progress`` chooses (``mls.progress``)."""
    if max_iters < 1:
        raise ValueError(f"max_iters must be at least 1, got {max_iters}")
    if devices * num_nodes > 1 and strategy == "auto":
        strategy = "ddp"
    shown = progress_callbacks(progress)
    return L.Trainer(
        max_steps=max_iters, max_epochs=-1, accelerator=accelerator, devices=devices, num_nodes=num_nodes,
        strategy=strategy, sync_batchnorm=strategy.startswith("ddp"),
        precision=precision, logger=build_loggers("csv", out, repetition=True) if loggers is None else loggers,
        log_every_n_steps=min(log_every, max_iters), enable_model_summary=False, default_root_dir=str(out),
        callbacks=[*callbacks, *shown], enable_progress_bar=bool(shown), plugins=trainer_plugins(),
        enable_checkpointing=any(isinstance(c, Checkpoint) for c in callbacks),
    )


def check_positive(**values: float) -> None:
    """Refuse non-positive sizes and rates before any training starts, naming the option."""
    for name, value in values.items():
        if value is None or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a positive number, got {value}")


@dataclass(frozen=True)
class RunOptions(RunLogging):
    """What every transfer command takes besides its protocol: the weights, the hardware, the output, the seed, and
    (``RunLogging``) where it logs."""

    weights: str = setting("random", "pretraining checkpoint (.ckpt), exported torchvision backbone (.pth/.pt), "
                                     'or "random"')
    arch: str | None = setting(None, "backbone (resnet18/34/50/101); null: from the checkpoint, else resnet50")
    small_stem: bool | None = setting(None, "3x3 stem for small images; null: from the checkpoint, else false")
    workers: int | None = setting(None, "data-loading processes per GPU; null: the machine's cores, at most 4")
    accelerator: str = setting("auto", "Lightning accelerator (auto, cpu, gpu)")
    devices: int = setting(1, "GPUs per node (use torchrun --nproc-per-node, or srun --ntasks-per-node, with the same "
                                         "number)")
    num_nodes: int = setting(1, "machines")
    strategy: str = setting("auto", "Lightning strategy (auto: ddp on several GPUs)")
    precision: str = setting("32-true", "Lightning precision (32-true, 16-mixed, bf16-mixed)")
    out: str | None = setting(None, "folder for results.json, results.md and run logs; null: "
                                    "runs/transfer/detect-FORMAT or runs/transfer/segment-DATASET")
    seed: int = setting(0, "seed of the first run (the others: seed + 1, seed + 2, ...)")
    save_every: int = setting(1000, "write each run's checkpoints/last.ckpt every this many iterations (and at "
                                     "its end), to go on from with --resume auto; 0: only at the end, on a crash "
                                     "or a signal")
    resume: Literal["auto"] | None = resume_set_setting()

    def __post_init__(self):
        super().__post_init__()
        check(self.workers is None or self.workers >= 0, "workers", f"must be >= 0, got {self.workers}")
        check(self.save_every >= 0, "save_every", f"must be >= 0 (0: only at the end), got {self.save_every}")
        check(self.devices >= 1 and self.num_nodes >= 1, "devices",
              f"and num_nodes must be at least 1, got {self.devices} and {self.num_nodes}")

    @property
    def loader_workers(self) -> int:
        return min(4, os.cpu_count() or 1) if self.workers is None else self.workers

    def trainer(self, out: Path, max_iters: int, callbacks: Sequence[L.Callback] = (),
                settings: dict | None = None) -> L.Trainer:
        """The trainer of one run in folder ``out`` (run0, run1, ...) with ``callbacks``, its loggers recording
        ``settings`` (the run's, resolved)."""
        loggers = build_loggers(self.logger, out, self.project, self.run_name, settings, repetition=True)
        return make_trainer(out, max_iters, self.accelerator, self.devices, self.num_nodes, self.strategy,
                            self.precision, callbacks=callbacks, loggers=loggers, progress=self.progress)


def with_run_options(fn: Callable) -> Callable:
    """Give ``fn(..., **run)`` one keyword option per ``RunOptions`` field (``--weights``, ``--devices``, ...)."""
    return flat_options(fn, (RunOptions,))


def _shown(value: Any) -> str:
    """A default as an option's help writes it: ``0.02``, ``60000 80000``, and ``640..800 step 32`` for a longer
    evenly spaced run."""
    if not isinstance(value, tuple):
        return str(value)
    gaps = {b - a for a, b in zip(value, value[1:])}
    if len(value) > 3 and len(gaps) == 1:
        return f"{value[0]}..{value[-1]} step {gaps.pop()}"
    return " ".join(map(str, value))


@dataclass(frozen=True)
class TransferOptions:
    """The options of one transfer command, each a documented field of a settings dataclass: the model's, the
    protocol's (unset: the chosen data set's protocol in ``protocols``) and ``RunOptions``.

    ``options`` gives a command function these options, ``settings`` turns the ones it was given back into
    the dataclasses, each checked where it is declared (in its ``__post_init__``).
    """

    model: type  # the settings of the model built on the backbone: head and sizes
    protocols: dict  # data set -> its protocol, all instances of one settings dataclass
    choice: str  # the option naming the data set, e.g. "--format"

    @property
    def protocol(self) -> type:
        """The settings dataclass of the protocols."""
        return type(next(iter(self.protocols.values())))

    def describe(self, f: Field) -> str:
        """A protocol option's help: its doc and each data set's value, e.g. "training iterations [coco: 90000;
        voc: 24000]" (data sets that agree share one entry)."""
        names_by_value: dict[str, list[str]] = {}
        for name, protocol in self.protocols.items():
            names_by_value.setdefault(_shown(getattr(protocol, f.name)), []).append(name)
        defaults = "; ".join(f"{', '.join(names)}: {value}" for value, names in names_by_value.items())
        return f"{field_doc(f)} [{defaults}]"

    def options(self, fn: Callable) -> Callable:
        """Give ``fn(..., **options)`` one keyword option per field of the model (with its default), then of the
        protocol (``None``: the data set's value), then of ``RunOptions``."""
        fn = flat_options(fn, (self.model,))
        return with_run_options(flat_options(fn, (self.protocol,), unset_is_none=True, describe=self.describe))

    def settings(self, key: str, options: dict) -> tuple[RunOptions, Any, Any]:
        """The run options, the model, and the protocol of data set ``key`` with each option given (not ``None``)
        in place of its value."""
        run, model, protocol = split_options(options, (RunOptions, self.model, self.protocol))
        run, model = RunOptions(**run), self.model(**model)
        if key not in self.protocols:
            raise ValueError(f"{self.choice} must be one of {', '.join(self.protocols)}, got {key!r}")
        return run, model, replace(self.protocols[key], **{k: v for k, v in protocol.items() if v is not None})
