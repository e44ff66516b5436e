"""Pretraining data: two MoCo-v2 views per image, reproducible per (seed, epoch, image).

The views of an image depend only on the run's seed, the epoch and the image index, not
on the worker or rank that makes them, nor on whether the run was resumed: the sampler
hands out ``(epoch, index)`` keys and each sample seeds its own random draws.
"""
from __future__ import annotations

from collections.abc import Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from mls.data.augment import MoCoV2View, TwoViewDataset
from mls.data.images import open_source


class EpochSampler(DistributedSampler):
    """``DistributedSampler`` (also for one process) that yields ``(epoch, index)`` keys."""

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, i) for i in super().__iter__())


class SeededViews(Dataset):
    """Makes sample ``index`` of ``epoch`` under a torch seed drawn from ``(seed, epoch, index)``."""

    def __init__(self, views: TwoViewDataset, seed: int):
        self.views, self.seed = views, seed

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, epoch, index)) & 0x7FFF_FFFF_FFFF_FFFF)
            return self.views[index]


class PretrainData(L.LightningDataModule):
    """Images from a folder (or the built-in synthetic scenes) as pairs of MoCo-v2 views."""

    def __init__(
        self,
        data: str | None = None,
        annotations: str | None = None,
        num_images: int = 2000,
        image_size: int = 64,
        batch_size: int = 64,
        workers: int = 2,
        seed: int = 0,
        blur: bool = True,
        min_scale: float = 0.2,
    ):
        super().__init__()
        self.settings = dict(data=data, annotations=annotations, image_size=image_size, batch_size=batch_size,
                             workers=workers, seed=seed)
        self.source = open_source(data, annotations=annotations, num_images=num_images, image_size=image_size,
                                  seed=seed)
        view = MoCoV2View(size=image_size, scale=(min_scale, 1.0), blur_p=0.5 if blur else 0.0)
        self.dataset = SeededViews(TwoViewDataset(self.source, view), seed)

    def describe(self) -> dict:
        """What the figures need to find the images again."""
        s = self.settings
        return {"data": s["data"], "annotations": s["annotations"], "num_images": len(self.source),
                "image_size": s["image_size"], "seed": s["seed"]}

    def labels(self) -> torch.Tensor | None:
        return self.source.multi_hot()

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        sampler = EpochSampler(
            self.dataset,
            num_replicas=trainer.world_size if trainer else 1,
            rank=trainer.global_rank if trainer else 0,
            shuffle=True,
            seed=self.settings["seed"],
            drop_last=True,
        )
        workers = self.settings["workers"]
        return DataLoader(
            self.dataset,
            batch_size=self.settings["batch_size"],
            sampler=sampler,
            drop_last=True,  # every rank pushes the same number of keys (MoCo)
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
        )
