"""Pretraining data: two MoCo-v2 views per image, reproducible per (seed, epoch, image).

The views of an image depend only on the run's seed, the epoch and the image index, not
on the worker or rank that makes them, nor on whether the run was resumed: the sampler
hands out ``(epoch, index)`` keys and each sample seeds its own random draws. A run resumed
in the middle of an epoch skips the keys that epoch had already trained on, so that it goes
on exactly as the uninterrupted run would have.
"""
from __future__ import annotations

from collections.abc import Iterator
from itertools import islice

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from mls.data.augment import MoCoV2View, TwoViewDataset
from mls.data.device_views import WorkerView, apply_appearance, collate_views
from mls.data.sources import open_source

AUGMENT_ON = ("cpu", "device")


class EpochSampler(DistributedSampler):
    """``DistributedSampler`` (also for one process) that yields ``(epoch, index)`` keys.

    ``resume_at=(epoch, skip)`` drops the first ``skip`` keys of that epoch on this rank: the ones a
    resumed run had already trained on. ``len()`` stays the full epoch's, as the trainer counts it.
    """

    def __init__(self, *args, resume_at: tuple[int, int] = (0, 0), **kwargs):
        super().__init__(*args, **kwargs)
        self.resume_at = resume_at

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, (resume_epoch, skip) = self.epoch, self.resume_at
        keys = super().__iter__()
        if epoch == resume_epoch:
            keys = islice(keys, skip, None)
        return ((epoch, i) for i in keys)


def resume_point(trainer: L.Trainer | None, steps_per_epoch: int) -> tuple[int, int]:
    """``(epoch, batches of it already trained on)`` where a fit goes on: ``(0, 0)`` for a fresh run.

    Read from the trainer's loop counters, which a resumed fit restores before it asks for the
    loader: an epoch that started and did not finish goes on after its last processed batch;
    otherwise the next epoch starts from its first batch.
    """
    if trainer is None:
        return 0, 0
    epochs = trainer.fit_loop.epoch_progress.current
    batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed
    if epochs.started > epochs.processed:  # stopped inside epoch `epochs.processed`
        if batches < steps_per_epoch:
            return epochs.processed, batches
        return epochs.processed + 1, 0
    return epochs.processed, 0


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
    """Images from a folder (or the built-in synthetic scenes) as pairs of views (MoCo-v2's by default).

    ``augment_on="device"``: the workers only decode, crop and flip, and send uint8 views with the
    random parameters of the rest of ``view``, applied to the batch once it is on the training device
    (``on_after_batch_transfer``, ``mls.data.device_views``); the views are the CPU path's, up to
    rounding. Either way the training step receives normalised float views.
    """

    def __init__(
        self,
        data: str | None = None,
        annotations: str | None = None,
        num_images: int = 2000,
        image_size: int = 64,
        batch_size: int = 64,
        workers: int = 2,
        seed: int = 0,
        view: MoCoV2View | None = None,
        augment_on: str = "cpu",
    ):
        super().__init__()
        if augment_on not in AUGMENT_ON:
            raise ValueError(f"augment_on must be one of {AUGMENT_ON}, got {augment_on!r}")
        self.settings = dict(data=data, annotations=annotations, image_size=image_size, batch_size=batch_size,
                             workers=workers, seed=seed, augment_on=augment_on)
        self.source = open_source(data, annotations=annotations, num_images=num_images, image_size=image_size,
                                  seed=seed)
        view = view or MoCoV2View(size=image_size)
        self._normalize = view.normalize
        if augment_on == "device":
            views = TwoViewDataset(self.source, WorkerView(view), tensors=True)
        else:
            views = TwoViewDataset(self.source, view)
        self.dataset = SeededViews(views, seed)
        self.resumed_split: dict | None = None  # how the checkpoint resumed from split its epochs

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the loader besides the trainer's step count, which gives its position:
        how each epoch was split (a resumed run must split it the same way to go on where it stopped)."""
        trainer = self.trainer
        return {"world_size": trainer.world_size if trainer else 1, "batch_size": self.settings["batch_size"]}

    def load_state_dict(self, state: dict) -> None:
        self.resumed_split = dict(state)

    def check_split(self, world: int, done: int) -> None:
        """Refuse to go on in the middle of an epoch split otherwise than the checkpoint's: each rank would
        skip the batches of another split, and images would be seen twice or not at all."""
        before = self.resumed_split
        now = {"world_size": world, "batch_size": self.settings["batch_size"]}
        if done and before is not None and before != now:
            raise ValueError(
                f"the checkpoint stopped in the middle of an epoch at world size {before['world_size']} and batch "
                f"{before['batch_size']}; this run has world size {world} and batch {now['batch_size']}: resume it with the same "
                "--devices, --num-nodes and --batch-size, or from a checkpoint written at the end of an epoch")

    def describe(self) -> dict:
        """What the figures need to find the images again, and a fingerprint to recognise them by."""
        s = self.settings
        return {"data": s["data"], "annotations": s["annotations"], "num_images": len(self.source),
                "image_size": s["image_size"], "seed": s["seed"], "fingerprint": self.source.fingerprint()}

    def labels(self) -> torch.Tensor | None:
        return self.source.multi_hot()

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """With ``augment_on="device"``: colour jitter, grayscale, blur and normalisation of both views, here.

        Here rather than in the module: the batch format and its completion stay in one place, and
        Lightning warns on every fit when a module overrides this hook next to a data module.
        """
        if self.settings["augment_on"] == "device":
            for n in (1, 2):
                batch[f"view{n}"] = apply_appearance(batch[f"view{n}"], batch.pop(f"appearance{n}"), self._normalize)
        return batch

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        world = trainer.world_size if trainer else 1
        batch_size = self.settings["batch_size"]
        epoch, done = resume_point(trainer, len(self.dataset) // world // batch_size)
        self.check_split(world, done)
        sampler = EpochSampler(
            self.dataset,
            num_replicas=world,
            rank=trainer.global_rank if trainer else 0,
            shuffle=True,
            seed=self.settings["seed"],
            drop_last=True,
            resume_at=(epoch, done * batch_size),
        )
        # Worker processes draw the first epoch's keys as the loader starts, before the trainer
        # sets the epoch: set it here.
        sampler.set_epoch(epoch)
        workers = self.settings["workers"]
        return DataLoader(
            self.dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=True,  # every rank pushes the same number of keys (MoCo)
            num_workers=workers,
            persistent_workers=workers > 0,
            # pinned batches (uint8 views too) let Lightning's copy to the GPU, which passes
            # non_blocking=True for every tensor, run asynchronously
            pin_memory=torch.cuda.is_available(),
            collate_fn=collate_views if self.settings["augment_on"] == "device" else None,
        )
