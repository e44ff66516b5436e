"""Full fine-tuning: every layer of the backbone plus a new linear head, trained with Lightning.

Default recipe per data set. The paper gives only the epochs: 120 for the seven small single-label
sets (main paper §4). The rest follows common SSL transfer practice: SGD momentum 0.9, cosine schedule
without restarts, ImageNet normalisation, RandomResizedCrop + flip. Every value can be overridden from
the command line.

| data set | resolution | epochs | lr | schedule | batch | weight decay |
|---|---|---|---|---|---|---|
| cub200, flowers102, cars, aircraft, pets, dtd, indoor67 | 224 | 120 (§4) | 0.01 | cosine | 64 | 1e-4 |
| voc07, imagefolder | 224 | 100 | 0.01 | cosine | 64 | 1e-4 |
| coco | 224 | 40 | 0.01 | cosine | 64 | 1e-4 |
| synthetic | generated size (64) | 30 | 0.05 | cosine | 64 | 1e-4 |
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader

from mls.eval.datasets import DATASETS, Transformed
from mls.eval.probes import Task, classification_loss
from mls.eval.transforms import test_transform, train_transform
from mls.progress import progress_callbacks
from mls.train.console import lightning_warnings_left_out
from mls.train.data_order import SeededLoader
from mls.train.resume import RunRecord, checkpoint_callbacks, run_of_set, trainer_plugins


@dataclass(frozen=True)
class Recipe:
    """One data set's fine-tuning defaults."""

    image_size: int | None = 224  # None: the size the data are generated at
    epochs: int = 100
    lr: float = 0.01
    batch_size: int = 64
    weight_decay: float = 1e-4


SMALL_SINGLE_LABEL = ("cub200", "flowers102", "cars", "aircraft", "pets", "dtd", "indoor67")

RECIPES = {
    **{name: Recipe() for name in DATASETS},
    **{name: Recipe(epochs=120) for name in SMALL_SINGLE_LABEL},  # main paper §4
    "coco": Recipe(epochs=40),
    "synthetic": Recipe(image_size=None, epochs=30, lr=0.05),
}


class FineTuner(L.LightningModule):
    """Backbone and linear head trained end to end with CE (single-label) or masked BCE (multi-label)."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, multilabel: bool,
                 epochs: int, lr: float, weight_decay: float):
        super().__init__()
        self.backbone, self.head = backbone, nn.Linear(feature_dim, num_classes)
        self.multilabel, self.epochs, self.lr, self.weight_decay = multilabel, epochs, lr, weight_decay

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images).flatten(1))

    def training_step(self, batch, batch_idx):
        images, targets = batch
        loss = classification_loss(self(images), targets, self.multilabel)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def predict_step(self, batch, batch_idx):
        images, targets = batch
        return self(images).float(), targets

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)
        return [optimizer], [torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.epochs)]


def finetune_model(task: Task, seed: int, epochs: int, lr: float, weight_decay: float, precision: str = "32-true",
                   runs_in: Path | None = None, first_seed: int = 0, save_every: int = 1,
                   resume: str | None = None, loggers: Callable[[Path, int], list[Logger]] | None = None,
                   progress: str = "auto") -> tuple:
    """Fine-tune a fresh copy of the backbone on the training split; return test logits and targets.

    With ``runs_in``, the run of ``seed`` has its folder there, ``run{seed - first_seed}``: it checkpoints every
    ``save_every`` epochs and keeps its result, and with ``resume="auto"`` a finished run is read back and an
    unfinished one goes on from its furthest checkpoint. ``loggers(folder, seed)`` gives the run's loggers
    (default: none); ``progress`` how it shows (``mls.progress``).
    """
    L.seed_everything(seed, workers=True, verbose=False)
    folder = None if runs_in is None else runs_in / f"run{seed - first_seed}"
    record = {"seed": seed, "epochs": epochs, "lr": lr, "weight_decay": weight_decay, "precision": precision,
              "weights": task.weights, "arch": task.arch, "small_stem": task.small_stem, "image_size": task.image_size,
              "batch_size": task.batch_size, "classes": list(task.data.classes), "train_images": len(task.data.train)}
    callbacks = []
    if folder is not None:
        callbacks = [*checkpoint_callbacks(folder, save_every, numbered=False), RunRecord(record)]
    shown = progress_callbacks(progress)
    batches = max(1, len(task.data.train) // task.batch_size)

    def trainer() -> L.Trainer:  # made when the run trains: a finished run read back leaves its files as they were
        return L.Trainer(max_epochs=epochs, accelerator="auto", devices=1, precision=precision,
                         logger=loggers(folder, seed) if loggers and folder is not None else False,
                         log_every_n_steps=min(50, batches),  # at least once an epoch
                         enable_model_summary=False, default_root_dir=folder, callbacks=[*callbacks, *shown],
                         enable_progress_bar=bool(shown), plugins=trainer_plugins(),
                         enable_checkpointing=folder is not None)

    train = partial(_train, task, seed, trainer, epochs, lr, weight_decay)
    return train(None) if folder is None else run_of_set(folder, resume, record, train)


def _train(task: Task, seed: int, make_trainer: Callable[[], L.Trainer], epochs: int, lr: float, weight_decay: float,
           ckpt_path: str | None) -> tuple:
    trainer = make_trainer()
    backbone, dim = task.backbone()
    model = FineTuner(backbone, dim, len(task.data.classes), task.data.multilabel, epochs, lr, weight_decay)
    train = Transformed(task.data.train, train_transform(task.image_size))
    data = SeededLoader(train, task.batch_size, seed, task.workers, drop_last=len(task.data.train) > task.batch_size)
    test = DataLoader(Transformed(task.data.test, test_transform(task.image_size)), batch_size=task.batch_size,
                      num_workers=task.workers)
    with lightning_warnings_left_out():
        trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    logits, targets = zip(*trainer.predict(model, test))
    return torch.cat(logits), torch.cat(targets)


def recipe_for(dataset: str, **overrides) -> Recipe:
    """The recipe of ``dataset`` with the options that were given (not None) replacing its defaults."""
    return replace(RECIPES.get(dataset, Recipe()), **{k: v for k, v in overrides.items() if v is not None})
