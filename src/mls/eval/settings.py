"""The settings of the ``mls eval`` commands, declared once: name, type, default, one-line doc and check.

Each field below is an option of ``mls eval linear``, ``finetune`` or ``knn`` (``--epochs``, ``--weights``),
with its doc as the option's help: a protocol's own settings (``LinearProtocol``, ``FinetuneProtocol``,
``KnnProtocol``), then those the three share (``EvalRun``). A new setting is one field here (plus, if it has
a range, one check in ``__post_init__``), then read where it is used.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from mls.eval.datasets import DATASETS
from mls.loggers import RunLogging
from mls.method.settings import setting
from mls.train.resume import resume_set_setting

MAX_WORKERS = 4  # data-loading processes by default: the machine's cores, at most this many


@dataclass(frozen=True)
class LinearProtocol:
    """The linear probe: a linear layer trained on frozen, standardised backbone features."""

    epochs: int = setting(100, "epochs of the linear layer over the cached features")
    lr: float = setting(0.1, "initial learning rate (SGD, momentum 0.9, cosine)")
    weight_decay: float = setting(0.0, "weight decay of the linear layer")


@dataclass(frozen=True)
class FinetuneProtocol:
    """Full fine-tuning; a setting left unset (None) takes the data set's recipe (``mls.eval.finetune.RECIPES``)."""

    epochs: int | None = setting(None, "training epochs (default: the data set's recipe)")
    lr: float | None = setting(None, "initial learning rate, SGD momentum 0.9, cosine (default: the data set's recipe)")
    weight_decay: float | None = setting(None, "weight decay (default: the data set's recipe)")
    precision: str = setting("32-true", "Lightning precision, e.g. 32-true, 16-mixed, bf16-mixed")
    save_every: int = setting(1, "write each run's checkpoints/last.ckpt every this many epochs (and at its end), "
                                 "to go on from with --resume auto; 0: only at the end, on a crash or a signal")
    resume: Literal["auto"] | None = resume_set_setting()

    def __post_init__(self):
        if self.save_every < 0:
            raise ValueError(f"--save-every must be >= 0 (0: only at the end), got {self.save_every}")


@dataclass(frozen=True)
class FinetuneOutput(RunLogging):
    """Where fine-tuning logs (each run in its folder OUT/runN) and how it shows its progress."""


@dataclass(frozen=True)
class KnnProtocol:
    """Weighted k-NN on L2-normalised frozen features."""

    k: int = setting(20, "number of neighbours")
    temperature: float = setting(0.07, "temperature of the exp(cosine / temperature) vote weights")


@dataclass(frozen=True)
class EvalRun:
    """What every ``mls eval`` command takes besides its protocol: weights, data, repetitions, loading, output."""

    weights: str = setting("random", 'pretraining checkpoint (.ckpt), exported torchvision backbone (.pth/.pt), or '
                                     '"random"')
    dataset: str = setting("synthetic", f"one of {', '.join(DATASETS)} (layouts in mls.eval.datasets)")
    data: str | None = setting(None, "folder holding the data set in its official layout (not needed for synthetic)")
    runs: int = setting(2, "repetitions with seeds seed, seed+1, ...; the report gives their mean and std")
    batch_size: int | None = setting(None, "batch size (default: 256 for features, the data set's recipe for "
                                           "fine-tuning)")
    image_size: int | None = setting(None, "input resolution (default: 224, or the pretraining size for synthetic "
                                           "data)")
    arch: str | None = setting(None, "backbone architecture (default: from the checkpoint, else resnet50)")
    small_stem: bool | None = setting(None, "3x3 stem for small images (default: from the checkpoint, else false)")
    workers: int | None = setting(None, f"data-loading processes (default: the machine's cores, at most {MAX_WORKERS})")
    out: str | None = setting(None, "folder for results.json and results.md (default: runs/eval/DATASET-PROTOCOL)")
    seed: int = setting(0, "seed of the first run")
    synthetic_images: int = setting(512, "number of generated training images of the synthetic task (test: half as "
                                         "many)")

    def folder(self, protocol: str) -> str:
        """Where a protocol's results (and fine-tuning's logs) go: ``out``, else runs/eval/DATASET-PROTOCOL."""
        return self.out or f"runs/eval/{self.dataset}-{protocol}"

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise ValueError(f"--dataset must be one of {', '.join(DATASETS)}, got {self.dataset!r}")
        if self.runs < 1:
            raise ValueError(f"--runs must be at least 1, got {self.runs}")

    @property
    def loader_workers(self) -> int:
        """``workers``, or the machine's cores (at most ``MAX_WORKERS``), read when a command runs."""
        return min(MAX_WORKERS, os.cpu_count() or 1) if self.workers is None else self.workers
