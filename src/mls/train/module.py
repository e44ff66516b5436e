"""The Lightning module that pretrains an ``MLS`` model: optimiser, schedule and logs."""
from __future__ import annotations

import dataclasses
import math
import time

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

import mls
from mls.method.model import MLS
from mls.neighbor_search import step_label_precision
from mls.train.settings import PretrainSettings


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then cosine decay to 0 (MoCo-v2)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def extra_weight_factor(epoch: float, start: float, ramp: float) -> float:
    """Share of λ at a (fractional) epoch: 0 before ``start``, then linear from 0 to 1 over ``ramp`` epochs.

    ``ramp = 0`` switches the extra loss on at once (InfoNCE alone before it: the main paper's other
    remedy for an unstable start).
    """
    if epoch < start:
        return 0.0
    return 1.0 if ramp <= 0 else min(1.0, (epoch - start) / ramp)


class PretrainModule(L.LightningModule):
    """SGD with momentum, warm-up + cosine schedule stepped every iteration, λ's schedule, one log per term.

    ``settings`` are the run's (``PretrainSettings``); the checkpoint stores them as plain dicts (``model``,
    ``train``, ``view``: what every version of mls wrote and reads), with ``steps_per_epoch``, ``total_batch``,
    ``data`` and ``mls_version``. The learning-rate schedule spans every epoch of the run, so a run stopped
    early and resumed follows the same rates as one that ran straight through. ``data`` describes the
    training data (for the figures); ``labels`` — the data set's multi-hot table when known — turns on the
    pseudo-label precision log.
    """

    def __init__(self, settings: PretrainSettings, steps_per_epoch: int = 1, total_batch: int = 256,
                 data: dict | None = None, labels: torch.Tensor | None = None):
        super().__init__()
        self.save_hyperparameters({
            "model": dataclasses.asdict(settings.model), "train": dataclasses.asdict(settings.train),
            "view": dataclasses.asdict(settings.view), "steps_per_epoch": steps_per_epoch,
            "total_batch": total_batch, "data": data, "mls_version": mls.__version__})
        self.model = MLS(settings.model)
        self.train_config = t = settings.train
        if t.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if t.compile:  # checkpoints with and without compile are interchangeable
            self.model.compile_encoders(t.compile)
        # the data set's multi-hot labels, on the model's device so that the precision costs no sync
        self.register_buffer("labels", None if labels is None else labels.bool(), persistent=False)
        self._last_step_time: float | None = None
        self.pending_health: dict[str, torch.Tensor] | None = None  # for mls.train.watch.HealthWatch
        self._failed = self._seen = 0

    def configure_optimizers(self):
        t, hp = self.train_config, self.hparams
        total, warmup = hp.steps_per_epoch * t.epochs, round(t.warmup_epochs * hp.steps_per_epoch)
        decay, no_decay = [], []  # the logit bias of the BCE is a prior, not a weight: no decay
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                (no_decay if name == "logit_bias" else decay).append(p)
        groups = [{"params": decay}] + ([{"params": no_decay, "weight_decay": 0.0}] if no_decay else [])
        optimizer = torch.optim.SGD(groups, lr=t.learning_rate(hp.total_batch), momentum=t.sgd_momentum,
                                    weight_decay=t.weight_decay, foreach=True)  # one kernel per group rather than one per tensor
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total, warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def extra_weight(self, step: int | None = None) -> float | torch.Tensor:
        """λ for a training step (default: this one): the configured weight times its schedule (start,
        ramp, full queue). From the step count, so also right in an epoch that a resumed run starts half-way."""
        t = self.train_config
        step = self.global_step if step is None else step
        factor = extra_weight_factor(step / self.hparams.steps_per_epoch, t.extra_start_epoch, t.extra_ramp_epochs)
        weight = self.model.config.extra_weight * factor
        if t.extra_after_full_queue:
            weight = weight * self.model.queue.full  # a tensor: no host sync
        return weight

    def on_train_epoch_start(self) -> None:
        self._failed = self._seen = 0

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x1, x2 = batch["view1"], batch["view2"]
        if self.train_config.channels_last:
            x1, x2 = x1.contiguous(memory_format=torch.channels_last), x2.contiguous(memory_format=torch.channels_last)
        weight = self.extra_weight()
        out = self.model(x1, x2, {"index": batch["index"], "box": batch["box2"]}, extra_weight=weight,
                         diagnose=self._logs_this_step())
        self._failed = self._failed + batch["failed"].sum()  # stays on the device: no sync per step
        self._seen += len(x1)

        logs = {f"train/{name}": out[name] for name in ("loss", "loss_infonce", "loss_extra", "pos_sim", "queue_fill")}
        logs["train/lr"] = self.optimizers().param_groups[0]["lr"]
        logs["train/extra_weight"] = weight
        if "health" in out:
            logs.update({f"health/{name}": value for name, value in out["health"].items()})
            self.pending_health = {**out["health"], "extra_weight": torch.as_tensor(weight)}  # λ now, for the watch
        if self.labels is not None:
            logs["train/label_precision"] = step_label_precision(self.labels, batch["index"], out["neighbor_index"])
        now = time.perf_counter()
        if self._last_step_time is not None:
            logs["train/images_per_sec"] = len(x1) * self.trainer.world_size / (now - self._last_step_time)
        self._last_step_time = now
        self.log_dict(logs, on_step=True, on_epoch=False)
        self.log("loss", out["loss"].detach(), prog_bar=True, on_step=True, on_epoch=False, logger=False)
        return out["loss"]

    def _logs_this_step(self) -> bool:
        """Whether Lightning writes this step's logs (every ``log_every`` steps): the health measures
        (``mls.method.health``) are computed only then."""
        connector = getattr(self._trainer, "_logger_connector", None)
        return connector is None or connector.should_update_logs  # outside a trainer: always

    def on_train_epoch_end(self) -> None:
        """Report unreadable images skipped this epoch, summed over workers and ranks; stop if too many."""
        counts = torch.stack([torch.as_tensor(self._failed, device=self.device),
                              torch.as_tensor(self._seen, device=self.device)]).double()
        failed, seen = (int(c) for c in self.trainer.strategy.reduce(counts, reduce_op="sum"))
        self.log("train/skipped_images", float(failed), on_epoch=True, sync_dist=False)
        if not failed:
            return
        share = failed / (failed + seen)
        rank_zero_info(f"epoch {self.current_epoch}: skipped {failed} unreadable images "
                       f"({share:.1%} of {failed + seen} read)")
        limit = self.train_config.max_failed_share
        if share > limit:
            raise RuntimeError(
                f"{share:.1%} of the images read in epoch {self.current_epoch} were unreadable, more than "
                f"max_failed_share={limit:.1%}; check the data folder")
