"""Resumption in one place: the checkpoints a run writes (their names, written atomically, the interrupted
run's), how a run stops for a requeue under SLURM, which checkpoint ``--resume`` picks and whether it may go
on, the refusal to start afresh over a run, and the runs of a set that finished and are read back.

Pretraining, the transfer commands and ``mls eval finetune`` all resume through here. The data loader keeps
its own part of the state (``mls.train.data_order``: the split of an epoch a run stopped in).
"""
from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback, Checkpoint, ModelCheckpoint, OnExceptionCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from mls.checkpoints.pretrained import UnreadableCheckpoint, atomic_save, is_pretraining_checkpoint, read_checkpoint
from mls.files import CheckpointNotWritten
from mls.method.settings import setting

CHECKPOINTS = "checkpoints"
INTERRUPTED = "interrupted"
RESULT = "result.pt"  # what a finished run of a set (transfer, fine-tuning) scored, read back on --resume auto
RUN_KEY = "mls_run"  # in a transfer or fine-tuning checkpoint: the settings of its run (``RunRecord``)
REQUEUE_SIGNAL = getattr(signal, "SIGUSR1", None)  # SLURM's warning before the time limit: --signal=USR1@90
REQUEUE_STATUS = 75  # EX_TEMPFAIL of sysexits.h: the run stopped to go on later; the job script requeues on it
T = TypeVar("T")
_requeue_asked = threading.Event()  # set by REQUEUE_SIGNAL, for the rest of the process


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


class FinalCheckpoint(Checkpoint):
    """``last.ckpt`` at the end of training when ``save_every`` did not just write it: a run stopped while it is
    scored goes on from there with nothing left to train, and ``last.ckpt`` holds the finished network."""

    def __init__(self, path: Path):
        self.path, self.saved_step = path, None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self.saved_step = trainer.global_step

    def on_train_end(self, trainer, pl_module) -> None:
        if self.saved_step != trainer.global_step:
            trainer.save_checkpoint(self.path)


def _note_requeue(signum, frame) -> None:
    _requeue_asked.set()


class Requeue(SystemExit):
    """The run stopped on ``REQUEUE_SIGNAL`` with its state in ``interrupted.ckpt``: the process ends with
    ``REQUEUE_STATUS``, which tells the job script to requeue it (docs/cluster.md)."""

    def __init__(self):
        super().__init__(REQUEUE_STATUS)


class RequeueSignal(Callback):
    """SIGUSR1, SLURM's warning before the time limit (``#SBATCH --signal=USR1@90``), stops training at the end
    of the first step that every rank has finished since any of them received it; ``InterruptedCheckpoint`` then
    writes ``interrupted.ckpt`` and the process ends with ``Requeue``. A signal between two runs of a set stops
    the next one after its first step. The handler is set when the trainer is built (in the main thread), before
    ``fit``: Lightning puts back, after a fit, the handlers it found."""

    def __init__(self):
        if REQUEUE_SIGNAL is not None and threading.current_thread() is threading.main_thread():
            signal.signal(REQUEUE_SIGNAL, _note_requeue)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.strategy.reduce_boolean_decision(_requeue_asked.is_set(), all=False):
            rank_zero_info(f"SIGUSR1: stopping after step {trainer.global_step} with {INTERRUPTED}.ckpt; exit status "
                           f"{REQUEUE_STATUS} asks the job script to requeue the run, which goes on with --resume auto")
            raise Requeue


def checkpoint_callbacks(out: Path, save_every: int, per: Literal["epoch", "step"] = "epoch",
                         numbered: bool = True) -> list:
    """Checkpoints every ``save_every`` epochs (or training steps): ``epochNNN.ckpt`` (``stepNNN.ckpt``) kept
    when ``numbered`` (pretraining), and ``last.ckpt``, also at the end; ``interrupted.ckpt`` on a crash or a
    signal (SIGTERM; SIGUSR1, which also stops the run for a requeue)."""
    folder = out / CHECKPOINTS
    every = {"every_n_epochs" if per == "epoch" else "every_n_train_steps": save_every}
    if numbered:
        periodic = ModelCheckpoint(folder, filename=f"{per}{{{per}:03d}}", auto_insert_metric_name=False,
                                   save_top_k=-1, save_last=True, **every)
    else:  # the newest only, under one name that a resumed run writes over
        periodic = ModelCheckpoint(folder, filename="last", save_top_k=1, enable_version_counter=False, **every)
    return [periodic, FinalCheckpoint(last_checkpoint(out)), InterruptedCheckpoint(folder, filename=INTERRUPTED),
            RequeueSignal()]


def trainer_plugins() -> list:
    """Atomic checkpoint writes and, under SLURM, Lightning's SLURM environment (ranks and world size from
    ``SLURM_PROCID``, ``SLURM_NTASKS``...) without its own requeue: a requeued job goes on from mls's checkpoints
    (``RequeueSignal``), not from Lightning's ``hpc_ckpt_N.ckpt`` (docs/cluster.md says why)."""
    return [AtomicCheckpointIO(), *([SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else [])]


def _progress(path: Path) -> tuple[int, float]:
    """(training step, modification time) of a checkpoint, read without loading its tensors."""
    ckpt = read_checkpoint(path, mmap=True)
    step = ckpt.get("global_step", -1) if isinstance(ckpt, dict) else -1
    return step, path.stat().st_mtime


def resolve_resume(resume: str | None, out: Path) -> str | None:
    """``auto``: whichever of ``last.ckpt``, ``interrupted.ckpt``, ``epochNNN.ckpt`` and ``stepNNN.ckpt`` in ``out`` got
    furthest (none: start afresh); else the path given. A run that failed before it restored its
    checkpoint wrote an ``interrupted.ckpt`` of step 0 before mls 0.7, which must not win over an older ``last.ckpt``.
    A file that cannot be read (damaged by a full disk or a copy) is skipped, with one line saying so."""
    if resume is None:
        return None
    if resume == "auto":
        folder = out / CHECKPOINTS
        found = [p for p in (folder / "last.ckpt", folder / f"{INTERRUPTED}.ckpt") if p.is_file()]
        found += sorted(folder.glob("epoch[0-9]*.ckpt")) + sorted(folder.glob("step[0-9]*.ckpt"))
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


def check_same_run(path: str, run: dict) -> None:
    """Before Lightning starts: ``path`` must be a full training checkpoint of the run described by ``run`` (a
    transfer or fine-tuning run: its command's settings and seed, as ``RunRecord`` wrote them into it)."""
    ckpt = read_checkpoint(path, mmap=True)
    if "optimizer_states" not in ckpt or "global_step" not in ckpt or RUN_KEY not in ckpt:
        raise ValueError(f"--resume {path} is not a checkpoint of a transfer or fine-tuning run that can go on")
    stored = ckpt[RUN_KEY]
    changed = sorted(k for k in {**stored, **run} if stored.get(k) != run.get(k))
    if changed:
        raise ValueError(f"--resume {path} is a checkpoint of a run with other settings ({', '.join(changed)}); "
                         "give the options of that run, or start a new one with another --out")


class RunRecord(Callback):
    """Writes the run's settings into each of its checkpoints, for ``check_same_run`` to compare a resumed run to."""

    def __init__(self, run: dict):
        self.run = run

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[RUN_KEY] = self.run


def start_point(resume: str | None, out: Path, check: Callable[[str], None]) -> str | None:
    """The checkpoint a run into ``out`` goes on from (None: a fresh run), checked by ``check(path)`` (pretraining:
    ``check_resumable`` against the run's data; a transfer or fine-tuning run: ``check_same_run``). A fresh run
    into a folder that holds checkpoints is refused."""
    ckpt_path = resolve_resume(resume, out)
    if ckpt_path is not None:
        check(ckpt_path)
        return ckpt_path
    written = sorted(p.name for p in (out / CHECKPOINTS).glob("*.ckpt"))
    if written:
        raise FileExistsError(f"{out} already holds the checkpoints of a run ({', '.join(written[:4])}): "
                              "pass --resume auto to continue it, or choose another --out")
    return None


def resume_set_setting() -> Any:
    """The ``resume`` option of a command that runs a set of runs (``--runs N``: transfer, fine-tuning)."""
    return setting(None, "auto: go on with the runs in OUT: a finished run's result is read back, an unfinished one "
                         "goes on from its furthest checkpoint; unset: a fresh set (refused where OUT holds runs)")


def run_of_set(folder: Path, resume: str | None, run: dict, train: Callable[[str | None], T | None],
               first: bool | None = None) -> T | None:
    """One run of a set (``--runs N``; a transfer or fine-tuning run) in ``folder``: with ``--resume auto`` a
    finished run's result is read back, not run again; else ``train(checkpoint)`` trains it (from where it
    stopped: ``start_point``, checked against ``run``) and its result is written. ``first``: whether this is the
    process that scores and reports (default: global rank zero, as Lightning reads it from the environment); the
    others get None."""
    first = rank_zero_only.rank == 0 if first is None else first
    result_file = folder / RESULT
    if result_file.is_file():
        if resume is None:
            raise FileExistsError(f"{folder} holds a finished run ({RESULT}): pass --resume auto to go on with the "
                                  "runs not finished yet, or choose another --out")
        return torch.load(result_file, weights_only=True) if first else None
    result = train(start_point(resume, folder, partial(check_same_run, run=run)))
    if first and result is not None:
        atomic_save(result, result_file)
    return result

