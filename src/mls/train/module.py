"""The Lightning module that pretrains an ``MLS`` model: optimiser, schedule and logs."""
from __future__ import annotations

import math
import time

import lightning as L
import torch

from lightning.pytorch.utilities import rank_zero_info

from mls.model import MLS


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then cosine decay to 0 (MoCo-v2)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def neighbour_precision(labels: torch.Tensor, query_index: torch.Tensor, neighbor_index: torch.Tensor) -> torch.Tensor:
    """Share of selected neighbours that share at least one true class with their query.

    ``labels`` is the data set's multi-hot table, ``neighbor_index`` (N x k) the source
    images of each query's pseudo-positives (-1: unknown, left out). NaN when none is known.
    """
    known = (neighbor_index >= 0).float()
    query = labels[query_index].bool()[:, None, :]
    neighbours = labels[neighbor_index.clamp(min=0)].bool()
    shared = (query & neighbours).any(-1).float()
    return (shared * known).sum() / known.sum()  # 0/0 = NaN when no neighbour is known


class PretrainModule(L.LightningModule):
    """SGD with momentum, warm-up + cosine schedule stepped every iteration, and one log per loss term.

    The schedule spans ``total_steps`` (all epochs of the run), so a run stopped early and
    resumed follows the same learning rates as one that ran straight through.

    ``model`` holds the ``MLS`` keyword arguments; ``data`` describes the training data (for
    the figures); ``labels`` — the multi-hot table of the data set when known — turns on the
    pseudo-label precision log.
    """

    def __init__(
        self,
        model: dict,
        lr: float = 0.03,
        weight_decay: float = 1e-4,
        sgd_momentum: float = 0.9,
        total_steps: int = 1,
        warmup_steps: int = 0,
        extra_start_epoch: int = 0,
        channels_last: bool = False,
        max_failed_share: float = 0.05,
        data: dict | None = None,
        labels: torch.Tensor | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["labels"])
        self.model = MLS(**model)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        # the data set's multi-hot labels, on the model's device so that the precision costs no sync
        self.register_buffer("labels", None if labels is None else labels.bool(), persistent=False)
        self._last_step_time: float | None = None
        self._failed = self._seen = 0

    def configure_optimizers(self):
        hp = self.hparams
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=hp.lr, momentum=hp.sgd_momentum, weight_decay=hp.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: warmup_cosine(s, hp.total_steps, hp.warmup_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_train_epoch_start(self) -> None:
        self._failed = self._seen = 0

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # set every step: a run resumed in the middle of an epoch does not start that epoch again
        self.model.extra_enabled = self.current_epoch >= self.hparams.extra_start_epoch
        x1, x2 = batch["view1"], batch["view2"]
        if self.hparams.channels_last:
            x1, x2 = x1.contiguous(memory_format=torch.channels_last), x2.contiguous(memory_format=torch.channels_last)
        out = self.model(x1, x2, {"index": batch["index"], "box": batch["box2"]})
        self._failed = self._failed + batch["failed"].sum()  # stays on the device: no sync per step
        self._seen += len(x1)

        logs = {f"train/{name}": out[name] for name in ("loss", "loss_infonce", "loss_extra", "pos_sim", "queue_fill")}
        logs["train/lr"] = self.optimizers().param_groups[0]["lr"]
        if self.labels is not None:
            logs["train/label_precision"] = neighbour_precision(self.labels, batch["index"], out["neighbor_index"])
        now = time.perf_counter()
        if self._last_step_time is not None:
            logs["train/images_per_sec"] = len(x1) * self.trainer.world_size / (now - self._last_step_time)
        self._last_step_time = now
        self.log_dict(logs, on_step=True, on_epoch=False)
        self.log("loss", out["loss"].detach(), prog_bar=True, on_step=True, on_epoch=False, logger=False)
        return out["loss"]

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
        if share > self.hparams.max_failed_share:
            raise RuntimeError(
                f"{share:.1%} of the images read in epoch {self.current_epoch} were unreadable, more than "
                f"max_failed_share={self.hparams.max_failed_share:.1%}; check the data folder")
