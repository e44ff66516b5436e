"""The order and the randomness a training run sees, the same whether or not it was stopped and resumed.

A sample depends only on the run's seed, the epoch and its index (``SeededSamples``), not on the worker or
rank that makes it; the sampler hands out ``(epoch, index)`` keys from a permutation drawn from the seed and
the epoch (``EpochSampler``), and a run resumed in the middle of an epoch skips the keys that epoch had already
trained on (``resume_point``). ``SeededLoader`` puts them together for any data set (pretraining's views, the
transfer and fine-tuning sets); ``SeededSteps`` does the same for what a training step draws itself.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import islice

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

SEED_MASK = 0x7FFF_FFFF_FFFF_FFFF  # torch.manual_seed takes a non-negative 64-bit seed


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


class SeededSamples(Dataset):
    """Makes sample ``index`` of ``epoch`` under a torch seed drawn from ``(seed, epoch, index)``: its random
    augmentation (views, crops, flips) is the same in whichever worker, rank or resumed run makes it."""

    def __init__(self, samples: Dataset, seed: int):
        self.samples, self.seed = samples, seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, epoch, index)) & SEED_MASK)
            return self.samples[index]


class SeededSteps(L.Callback):
    """Seeds torch before each training step from ``(seed, step, rank)``: what the step draws itself (a
    detector's training size and sampled proposals) is the same in a resumed run as in the uninterrupted one,
    without keeping generator states in the checkpoint."""

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        torch.manual_seed(hash((self.seed, trainer.global_step, trainer.global_rank)) & SEED_MASK)


class SeededLoader(L.LightningDataModule):
    """A data set as a run's training data: each epoch a seeded permutation split over the ranks, each sample
    seeded (``SeededSamples``), and a resumed run going on after the last batch it had trained on.

    A checkpoint keeps how each epoch was split (world size and batch): going on in the middle of an epoch
    split otherwise is refused, as each rank would skip the batches of another split.
    """

    def __init__(self, samples: Dataset, batch_size: int, seed: int, workers: int = 0,
                 collate_fn: Callable | None = None, drop_last: bool = True):
        super().__init__()
        self.dataset = SeededSamples(samples, seed)
        self.batch_size, self.seed, self.workers = batch_size, seed, workers
        self.collate_fn, self.drop_last = collate_fn, drop_last
        self.resumed_split: dict | None = None  # how the checkpoint resumed from split its epochs

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the loader besides the trainer's step count, which gives its position:
        how each epoch was split (a resumed run must split it the same way to go on where it stopped)."""
        trainer = self.trainer
        return {"world_size": trainer.world_size if trainer else 1, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        self.resumed_split = dict(state)

    def check_split(self, world: int, done: int) -> None:
        """Refuse to go on in the middle of an epoch split otherwise than the checkpoint's: each rank would
        skip the batches of another split, and images would be seen twice or not at all."""
        before = self.resumed_split
        now = {"world_size": world, "batch_size": self.batch_size}
        if done and before is not None and before != now:
            raise ValueError(
                f"the checkpoint stopped in the middle of an epoch at world size {before['world_size']} and batch "
                f"{before['batch_size']}; this run has world size {world} and batch {now['batch_size']}: resume it with the same "
                "--devices, --num-nodes and --batch-size, or from a checkpoint written at the end of an epoch")

    def steps_per_epoch(self, world: int) -> int:
        """Batches of an epoch on each rank."""
        per_rank = len(self.dataset) // world
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        world = trainer.world_size if trainer else 1
        epoch, done = resume_point(trainer, self.steps_per_epoch(world))
        self.check_split(world, done)
        sampler = EpochSampler(self.dataset, num_replicas=world, rank=trainer.global_rank if trainer else 0,
                               shuffle=True, seed=self.seed, drop_last=True, resume_at=(epoch, done * self.batch_size))
        # Worker processes draw the first epoch's keys as the loader starts, before the trainer
        # sets the epoch: set it here.
        sampler.set_epoch(epoch)
        return DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=sampler, drop_last=self.drop_last,
            num_workers=self.workers, persistent_workers=self.workers > 0,
            # pinned batches (uint8 views too) let Lightning's copy to the GPU, which passes
            # non_blocking=True for every tensor, run asynchronously
            pin_memory=torch.cuda.is_available(), collate_fn=self.collate_fn,
        )
