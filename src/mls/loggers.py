"""Where a run's logs go: Lightning's own loggers, chosen by name (``--logger csv,tensorboard,wandb,mlflow``).

Pretraining, fine-tuning and the transfer commands build theirs here, each with the run's settings logged as
hyperparameters. W&B takes its project from ``--project`` or ``WANDB_PROJECT`` and runs offline under
``WANDB_MODE=offline``; MLflow writes to ``MLFLOW_TRACKING_URI``, else to a file store in OUT/mlruns.
"""
from __future__ import annotations

import csv
import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from mls.method.settings import check, setting
from mls.progress import Progress, check_progress, progress_setting

LOGGERS = ("csv", "tensorboard", "wandb", "mlflow")
# the loggers that need a package of their own: its module, which is also the name of mls-ssl's extra
_PACKAGES = {"wandb": "wandb", "mlflow": "mlflow"}
DEFAULT_PROJECT = "mls"  # the W&B project and MLflow experiment when neither an option nor the environment names one


def logger_setting(default: str) -> Any:
    """The ``logger`` field of a command's settings: the loggers by name, as a text or a list."""
    return setting(default, f"where the run logs: {', '.join(LOGGERS)}, or several (csv,wandb or a list)",
                   str | list[str])


def project_setting() -> Any:
    """The ``project`` field of a command's settings."""
    return setting(None, "W&B project and MLflow experiment; null: WANDB_PROJECT (W&B) or MLFLOW_EXPERIMENT_NAME "
                         "(MLflow), else mls")


def run_name_setting() -> Any:
    """The ``run_name`` field of a command's settings."""
    return setting(None, "the run's name in W&B and MLflow; null: the name of its output folder")


def logger_names(value: str | Sequence[str]) -> tuple[str, ...]:
    """``"csv,wandb"`` or ``["csv", "wandb"]`` as ``("csv", "wandb")``: at least one, each known, each once."""
    parts = value.split(",") if isinstance(value, str) else [part for v in value for part in str(v).split(",")]
    names = tuple(dict.fromkeys(part.strip().lower() for part in parts if part.strip()))
    unknown = [name for name in names if name not in LOGGERS]
    check(names and not unknown, "logger", f"must name one or more of {', '.join(LOGGERS)}, got {value!r}")
    return names


def normalise_logger(settings: Any) -> None:
    """In a settings dataclass's ``__post_init__``: its ``logger`` checked and written as ``"csv,wandb"``, whether
    it was given as a text or a list (a plain text is what checkpoints and hparams.yaml store)."""
    object.__setattr__(settings, "logger", ",".join(logger_names(settings.logger)))


@dataclass(frozen=True)
class RunLogging:
    """Where a fine-tuning or transfer run logs (each repetition in its folder OUT/runN) and how it shows its
    progress (``mls.progress``)."""

    logger: str = logger_setting("csv")
    project: str | None = project_setting()
    run_name: str | None = run_name_setting()
    progress: Progress = progress_setting()

    def __post_init__(self):
        normalise_logger(self)
        check_progress(self.progress)


class _ContinuedWriter(ExperimentWriter):
    """Lightning's CSV writer, except that a metrics.csv already in its folder is continued, with its columns,
    rather than deleted: a resumed transfer or fine-tuning run logs after the steps of its first part."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = next(csv.reader(file), [])


class _ContinuedCSVLogger(CSVLogger):
    """The CSV logger of one run of a repeated command: OUT/metrics.csv, continued when the run is resumed."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuedWriter(log_dir=self.log_dir)
        return self._experiment


def require_logger_packages(names: str | Sequence[str]) -> None:
    """Refuse, before a run starts, a logger whose package is not installed, saying how to install it."""
    for name in logger_names(names):
        module = _PACKAGES.get(name)
        if module is not None and importlib.util.find_spec(module) is None:
            raise ValueError(f"--logger {name} needs the {module} package: pip install mls-ssl[{module}]")


class _WandbRun(WandbLogger):
    """Lightning's W&B logger that ends its run when training ends, so that the next run in the same process (a
    study's cell, a transfer's repetition) gets a run of its own rather than W&B's current one; what comes after
    (fine-tuning's predictions) is not logged, rather than starting another run."""

    def __init__(self, where: str, **options):
        super().__init__(**options)
        self.where, self._finished = where, False

    def log_hyperparams(self, params) -> None:
        if not self._finished:
            super().log_hyperparams(params)

    def log_metrics(self, metrics, step=None) -> None:
        if not self._finished:
            super().log_metrics(metrics, step)

    def finalize(self, status: str) -> None:
        super().finalize(status)
        if self._experiment is not None and not self._finished:
            self._experiment.finish(exit_code=0 if status == "success" else 1)
            self._finished = True


class _MLflowRun(MLFlowLogger):
    """Lightning's MLflow logger, with where it writes in words for the run's last lines."""

    def __init__(self, where: str, **options):
        super().__init__(**options)
        self.where = where


def _wandb(out: Path, project: str | None, name: str) -> WandbLogger:
    """W&B under WANDB_DIR, else OUT; offline when WANDB_MODE says so."""
    project = project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT
    save_dir = Path(os.environ.get("WANDB_DIR") or out)
    save_dir.mkdir(parents=True, exist_ok=True)
    offline = os.environ.get("WANDB_MODE") in ("offline", "dryrun")
    where = f"W&B project {project}, run {name}" + (f" (offline, in {save_dir / 'wandb'})" if offline else "")
    return _WandbRun(where, project=project, name=name, save_dir=str(save_dir), offline=offline)


def _mlflow(out: Path, project: str | None, name: str) -> MLFlowLogger:
    """MLflow at MLFLOW_TRACKING_URI, else a file store in OUT/mlruns (which MLflow 3 keeps only on request)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or (Path(out).resolve() / "mlruns").as_uri()
    if uri.startswith("file:") or "://" not in uri:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    experiment = project or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_PROJECT
    return _MLflowRun(f"MLflow experiment {experiment}, run {name}, at {uri}", experiment_name=experiment,
                      run_name=name, tracking_uri=uri)


def build_loggers(names: str | Sequence[str], out: str | Path, project: str | None = None, run_name: str | None = None,
                  hparams: dict | None = None, repetition: bool = False) -> list[Logger]:
    """Lightning's loggers of ``names``, writing under ``out``, with ``hparams`` (the run's settings) logged to each.

    csv: OUT/csv/version_N/metrics.csv (each resumed part of a run its own file); tensorboard: OUT/tensorboard;
    wandb and mlflow: a run named ``run_name`` (default: OUT's name) in ``project``. With ``repetition``, OUT is
    one of a command's repeated runs (run0, seed1, ...): the CSV is OUT/metrics.csv and the run is named
    RUN_NAME-run0 (default: the command's folder's name). A missing package is refused first.
    """
    names, out = logger_names(names), Path(out)
    require_logger_packages(names)
    name = run_name or (out.resolve().parent.name if repetition else out.resolve().name)
    name = f"{name}-{out.name}" if repetition else name
    build = {"csv": lambda: _ContinuedCSVLogger(out, name="", version="") if repetition else CSVLogger(out, name="csv"),
             "tensorboard": lambda: TensorBoardLogger(out, name="tensorboard", version=""),
             "wandb": lambda: _wandb(out, project, name),
             "mlflow": lambda: _mlflow(out, project, name)}
    loggers = [build[key]() for key in names]
    for logger in loggers if hparams else []:
        logger.log_hyperparams(hparams)
    return loggers


def log_places(loggers: Sequence[Logger]) -> list[str]:
    """Where each logger writes, in a run's last lines: a CSV file, a TensorBoard folder, a W&B or MLflow run."""
    places = []
    for logger in loggers:
        if isinstance(logger, CSVLogger):
            places.append(str(Path(logger.log_dir) / "metrics.csv"))
        elif isinstance(logger, TensorBoardLogger):
            places.append(str(Path(logger.log_dir)))
        else:
            places.append(getattr(logger, "where", type(logger).__name__))
    return places
