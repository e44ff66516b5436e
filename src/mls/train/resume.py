"""Resumption in one place: the checkpoints a run writes (their names, written atomically, the interrupted
run's), which one ``--resume`` picks and whether it may go on, and the refusal to start afresh over a run.

The data module keeps its own part of the state (``mls.train.data_module``: the split of an epoch a run stopped in).
"""
from __future__ import annotations

from pathlib import Path

from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from mls.checkpoints.pretrained import UnreadableCheckpoint, atomic_save, is_pretraining_checkpoint, read_checkpoint
from mls.files import CheckpointNotWritten

CHECKPOINTS = "checkpoints"
INTERRUPTED = "interrupted"


def last_checkpoint(out: Path) -> Path:
    """Where a run into ``out`` writes its latest checkpoint."""
    return out / CHECKPOINTS / "last.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints go to a temporary file that is synced and renamed over the old one: a crash, a kill or
    a full disk never leaves half a file, and a failed write stops the run with ``CheckpointNotWritten``."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        try:
            atomic_save(checkpoint, path)
        except OSError as error:
            raise CheckpointNotWritten(path, error) from error


class InterruptedCheckpoint(OnExceptionCheckpoint):
    """``interrupted.ckpt`` on a crash or a signal once the run has trained past where it started. Not
    before (a run refused or failing while it sets up has nothing new to keep, and a write would replace
    the checkpoint it resumed from with its own, possibly refused, settings), nor when writing a checkpoint
    is what failed (another write would fail the same way and hide the first error)."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.first_step = trainer.global_step

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        started = getattr(self, "first_step", None)
        trained = started is not None and trainer.global_step > started
        if trained and not isinstance(exception, CheckpointNotWritten):
            super().on_exception(trainer, pl_module, exception)


def checkpoint_callbacks(out: Path, save_every: int) -> list:
    """``epochNNN.ckpt`` every ``save_every`` epochs, ``last.ckpt`` and, on a crash, ``interrupted.ckpt``."""
    folder = out / CHECKPOINTS
    return [ModelCheckpoint(folder, filename="epoch{epoch:03d}", auto_insert_metric_name=False,
                            every_n_epochs=save_every, save_top_k=-1, save_last=True),
            InterruptedCheckpoint(folder, filename=INTERRUPTED)]


def _progress(path: Path) -> tuple[int, float]:
    """(training step, modification time) of a checkpoint, read without loading its tensors."""
    ckpt = read_checkpoint(path, mmap=True)
    step = ckpt.get("global_step", -1) if isinstance(ckpt, dict) else -1
    return step, path.stat().st_mtime


def resolve_resume(resume: str | None, out: Path) -> str | None:
    """``auto``: whichever of ``last.ckpt``, ``interrupted.ckpt`` and ``epochNNN.ckpt`` in ``out`` got
    furthest (none: start afresh); else the path given. A run that failed before it restored its
    checkpoint wrote an ``interrupted.ckpt`` of step 0 before mls 0.7, which must not win over an older ``last.ckpt``.
    A file that cannot be read (damaged by a full disk or a copy) is skipped, with one line saying so."""
    if resume is None:
        return None
    if resume == "auto":
        folder = out / CHECKPOINTS
        found = [p for p in (folder / "last.ckpt", folder / f"{INTERRUPTED}.ckpt") if p.is_file()]
        found += sorted(folder.glob("epoch[0-9]*.ckpt"))
        progress, skipped = {}, []
        for path in found:
            try:
                progress[path] = _progress(path)
            except UnreadableCheckpoint as error:
                skipped.append(str(error))
                rank_zero_info(f"--resume auto: skipping {error.path}: {error.reason}")
        if found and not progress:
            raise ValueError(f"--resume auto: none of the {len(found)} checkpoints in {folder} can be read "
                             f"({skipped[0]}); resume from a copy with --resume PATH, or start anew with another --out")
        return str(max(progress, key=progress.get)) if progress else None
    if not Path(resume).is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {resume}")
    return resume


def check_resumable(path: str, data: dict) -> None:
    """Before Lightning starts: ``path`` must be a full training checkpoint of ``mls pretrain`` (not
    exported weights), made on the same data (when its data fingerprint is known: not before mls 0.3)."""
    ckpt = read_checkpoint(path, mmap=True)
    if not is_pretraining_checkpoint(ckpt):
        raise ValueError(f"--resume {path} is not a checkpoint of `mls pretrain` (no model hyper-parameters)")
    if "optimizer_states" not in ckpt or "global_step" not in ckpt:
        raise ValueError(f"--resume {path} holds the model but not the training state (optimiser, step) that "
                         "resuming needs; start a new run, or export or evaluate it instead")
    stored = (ckpt["hyper_parameters"].get("data") or {}).get("fingerprint")
    if stored is not None and stored != data.get("fingerprint"):
        raise ValueError(f"--resume {path} was pretrained on other data: {stored}, but this run's data is "
                         f"{data.get('fingerprint')}; pass the same --data (or --num-images, --image-size and "
                         "--seed of the built-in scenes), or start a new run with another --out")


def start_point(resume: str | None, out: Path, data: dict) -> str | None:
    """The checkpoint a run into ``out`` goes on from (None: a fresh run), checked against the run's ``data``
    (``PretrainData.describe()``). A fresh run into a folder that holds checkpoints is refused."""
    ckpt_path = resolve_resume(resume, out)
    if ckpt_path is not None:
        check_resumable(ckpt_path, data)
        return ckpt_path
    written = sorted(p.name for p in (out / CHECKPOINTS).glob("*.ckpt"))
    if written:
        raise FileExistsError(f"{out} already holds the checkpoints of a run ({', '.join(written[:4])}): "
                              "pass --resume auto to continue it, or choose another --out")
    return None
