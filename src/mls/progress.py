"""How a run shows its progress (``--progress auto|bar|lines|off``): Lightning's bar on a terminal, plain lines
where stdout is a file (a cluster job's log, which a bar would fill with thousands of carriage-return frames), or
nothing."""
from __future__ import annotations

import datetime
import sys
import time
import typing
from collections.abc import Callable
from typing import Any, Literal, TextIO

import lightning as L
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.callbacks import ProgressBar as LightningProgressBar

from mls.method.settings import check, setting

Progress = Literal["auto", "bar", "lines", "off"]
PROGRESS: tuple[str, ...] = typing.get_args(Progress)
LINE_SECONDS = 30.0  # a progress line at most this often, besides one at each epoch's end


def progress_setting() -> Any:
    """The ``progress`` field of a command's settings."""
    return setting("auto", f"how progress is shown: bar (Lightning's), lines (a plain line every {LINE_SECONDS:g} s "
                           "and at each epoch's end, for a log file), off, or auto (bar on a terminal, else lines)")


def check_progress(value: str) -> None:
    check(value in PROGRESS, "progress", f"must be one of {', '.join(PROGRESS)}, got {value!r}")


def progress_mode(choice: str, stream: TextIO | None = None) -> str:
    """``bar``, ``lines`` or ``off``: ``auto`` is a bar when stdout (where Lightning's bar writes) is a terminal."""
    if choice != "auto":
        return choice
    stream = sys.stdout if stream is None else stream
    return "bar" if getattr(stream, "isatty", lambda: False)() else "lines"


def _shown(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class ProgressLines(LightningProgressBar):
    """Training progress as plain lines, printed to stdout: one every ``every`` seconds, one at each epoch's end
    and one when training ends; no carriage returns, so that a log file reads line by line. Only the first
    process prints (Lightning's progress bars disable themselves elsewhere)."""

    def __init__(self, every: float = LINE_SECONDS, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.every, self.clock = every, clock
        self._enabled = True
        self._started = self._printed_at = 0.0
        self._printed_step: int | None = None
        self._batch = 0  # batches done in this epoch

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = self._printed_at = self.clock()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._batch = batch_idx + 1
        if self.clock() - self._printed_at >= self.every:
            self._print_line(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._print_line(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._printed_step:
            self._print_line(trainer, pl_module)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        """The progress bar's metrics without ``v_num``, the logger's version folder."""
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics

    def line(self, trainer: L.Trainer, pl_module: L.LightningModule) -> str:
        """One line: "epoch 2/8, batch 31/31, step 62, 0:01:05: loss=5.123", with totals where the trainer has them."""
        epochs = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        steps = f"/{trainer.max_steps}" if trainer.max_steps and trainer.max_steps > 0 else ""
        elapsed = datetime.timedelta(seconds=round(self.clock() - self._started))
        metrics = ", ".join(f"{name}={_shown(value)}" for name, value in self.get_metrics(trainer, pl_module).items())
        return (f"epoch {trainer.current_epoch + 1}{epochs}, batch {self._batch}/{self.total_train_batches}, "
                f"step {trainer.global_step}{steps}, {elapsed}" + (f": {metrics}" if metrics else ""))

    def _print_line(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._enabled:
            print(self.line(trainer, pl_module), flush=True)
        self._printed_at, self._printed_step = self.clock(), trainer.global_step


def progress_callbacks(choice: str, bar: Callable[[], Callback] = TQDMProgressBar,
                       lines: Callable[[], Callback] = ProgressLines) -> list[Callback]:
    """The progress callback that ``choice`` asks for, made by ``bar`` or ``lines``; none for ``off``. The trainer
    takes ``enable_progress_bar=bool(callbacks)``: without one, Lightning would add its own bar."""
    return {"bar": lambda: [bar()], "lines": lambda: [lines()], "off": list}[progress_mode(choice)]()
