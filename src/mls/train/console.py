"""What a run shows while it trains: the progress bar or lines (with the health watch's word), and Lightning's
adverts and warnings that do not apply to these runs left out."""
from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar

from mls.progress import ProgressLines, progress_callbacks
from mls.train.watch import HealthWatch

# Lightning warnings that do not apply to these runs: `mls.train.resume` picks the checkpoint (with
# OnExceptionCheckpoint, Lightning goes looking for a "last" one on every fresh fit), and the sampler
# goes on mid-epoch from the restored step (mls.train.data_module), which Lightning cannot see.
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


@contextlib.contextmanager
def lightning_warnings_left_out() -> Iterator[None]:
    """Within the block, the warnings above are not shown."""
    with warnings.catch_warnings():
        for message in _NOT_APPLICABLE:
            warnings.filterwarnings("ignore", message=message)
        for message, category in _INTERNAL:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield


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


def health_watch(trainer: L.Trainer) -> HealthWatch | None:
    """The run's ``HealthWatch``, or None."""
    return next((c for c in getattr(trainer, "callbacks", []) if isinstance(c, HealthWatch)), None)


def _with_health(metrics: dict, trainer: L.Trainer) -> dict:
    """Progress metrics without ``v_num``, the logger's version folder, which says nothing about training, and
    with what ``HealthWatch`` reports (``health=...``) once it has reported something."""
    metrics.pop("v_num", None)
    watch = health_watch(trainer)
    if watch is not None and watch.status is not None:
        metrics["health"] = watch.status
    return metrics


class ProgressBar(TQDMProgressBar):
    """Lightning's progress bar with the health watch's word (``_with_health``)."""

    def get_metrics(self, trainer, pl_module):
        return _with_health(super().get_metrics(trainer, pl_module), trainer)


class HealthProgressLines(ProgressLines):
    """Progress lines (``mls.progress``) with the health watch's word (``_with_health``)."""

    def get_metrics(self, trainer, pl_module):
        return _with_health(super().get_metrics(trainer, pl_module), trainer)


def pretrain_progress(choice: str, refresh_rate: int) -> list[L.Callback]:
    """A pretraining run's progress callback as ``--progress`` chooses (``mls.progress``), with the health watch's
    word; the bar refreshed every ``refresh_rate`` steps."""
    return progress_callbacks(choice, bar=lambda: ProgressBar(refresh_rate=refresh_rate), lines=HealthProgressLines)
