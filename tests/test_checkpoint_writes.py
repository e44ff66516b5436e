"""Checkpoint writes that survive SIGKILL at any moment, and a full disk that stops the run cleanly."""
import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY
from mls.checkpoints.pretrained import read_checkpoint
from mls.train import pretrain
from mls.train.resume import resolve_resume

EPOCHS = 1000


def cli_args(out: Path, **overrides) -> list[str]:
    settings = {**TINY, "out": str(out), **overrides}
    return [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]


def finished_checkpoints(out: Path) -> list[Path]:
    """Checkpoints under their final names (the writer's temporary files start with a dot)."""
    return [p for p in (out / "checkpoints").glob("*.ckpt") if not p.name.startswith(".")]


@pytest.mark.slow
def test_sigkill_at_a_random_moment_leaves_a_run_that_resumes(tmp_path):
    """5 runs, each killed (SIGKILL: no handler, no interrupted.ckpt) a seeded random time after its first
    checkpoint, often while a checkpoint is being written; each resumes with --resume auto and trains on.
    The runs start together, so that their interpreters start up side by side."""
    rng = random.Random(1234)
    delays = [rng.uniform(0.0, 4.0) for _ in range(5)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = []
    for trial in range(len(delays)):
        out = tmp_path / f"trial{trial}"
        cmd = [sys.executable, "-m", "mls.cli", "pretrain", *cli_args(out, epochs=EPOCHS, save_every=1, seed=trial)]
        log = open(tmp_path / f"trial{trial}.log", "wb")  # a file, not a pipe that the progress bar could fill
        runs.append((out, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=env)))
        log.close()
    try:
        first_seen: dict[int, float] = {}
        deadline = time.monotonic() + 240
        while len(first_seen) < len(runs) or any(p.poll() is None for _, p in runs):
            now = time.monotonic()
            assert now < deadline, "the runs did not start"
            for trial, (out, proc) in enumerate(runs):
                if proc.poll() is not None:
                    assert trial in first_seen, (tmp_path / f"trial{trial}.log").read_text()[-3000:]
                    continue
                if trial not in first_seen and finished_checkpoints(out):
                    first_seen[trial] = now
                if trial in first_seen and now >= first_seen[trial] + delays[trial]:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait(timeout=30)
            time.sleep(0.05)
    finally:
        for _, proc in runs:
            proc.kill()
            proc.wait()

    for trial, (out, proc) in enumerate(runs):
        assert proc.returncode == -signal.SIGKILL
        found = resolve_resume("auto", out)
        assert found is not None, f"trial {trial}: no readable checkpoint"
        step = read_checkpoint(found, mmap=True)["global_step"]
        resumed = pretrain(out=str(out), resume="auto", epochs=EPOCHS, save_every=1, seed=trial, max_steps=step + 2,
                           **TINY)
        assert read_checkpoint(resumed)["global_step"] == step + 2, f"trial {trial}"


@pytest.mark.slow
def test_a_full_disk_stops_the_run_in_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    """A checkpoint write that fails half-way (ENOSPC) leaves every file written before byte-identical and
    no temporary file, and the mls executable says what happened in one line."""
    out, small = tmp_path / "run", {**TINY, "num_images": 16, "queue_size": 12}  # 2 steps an epoch
    pretrain(out=str(out), epochs=3, max_steps=2, **small)  # epoch000.ckpt and last.ckpt at step 2
    before = {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()}
    assert set(before) == {"epoch000.ckpt", "last.ckpt", "best.ckpt"}  # best: the demo's --monitor
    # torch.save writes part of the file, then the disk is full
    script = f"""
import errno, sys, torch
def full_disk(obj, f, *args, **kwargs):
    with open(f, "wb") as handle:
        handle.write(b"PK" + bytes(1000))
    raise OSError(errno.ENOSPC, "No space left on device")
torch.save = full_disk
from mls.cli import console
sys.argv = ["mls", "pretrain", "--resume", "auto", "--epochs", "3", "--max-steps", "4",
            *{cli_args(out, num_images=16, queue_size=12)!r}]
console()
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MLS_TRACEBACK": ""})
    assert proc.returncode == 1, proc.stderr[-3000:]
    last_line = proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr and last_line.startswith("mls: error: cannot write checkpoint ")
    assert "No space left on device" in last_line and "unchanged" in last_line
    assert proc.stderr.count("mls: error") == 1
    after = {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()}
    assert after == before  # no new, half-written or temporary file, and the old ones untouched


def test_a_failed_atomic_write_leaves_the_previous_file_byte_identical(tmp_path, monkeypatch):
    from mls.checkpoints.pretrained import atomic_save

    path = tmp_path / "last.ckpt"
    atomic_save({"global_step": 1, "w": torch.arange(10)}, path)
    before = path.read_bytes()

    def full_disk(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK" + bytes(100))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        atomic_save({"global_step": 2}, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


@pytest.mark.slow
def test_save_every_zero_keeps_last_checkpoint_only_and_a_negative_value_is_refused(tmp_path):
    """save_every 0 (what a study's cells use) writes last.ckpt at each epoch's end and no epochNNN.ckpt (best.ckpt
    is the demo's --monitor's)."""
    out, small = tmp_path / "run", {**TINY, "num_images": 16, "queue_size": 12}  # 2 steps an epoch
    pretrain(out=str(out), epochs=2, save_every=0, **small)
    assert sorted(p.name for p in finished_checkpoints(out)) == ["best.ckpt", "last.ckpt"]
    assert read_checkpoint(out / "checkpoints" / "last.ckpt")["global_step"] == 4
    with pytest.raises(ValueError, match="save_every"):
        pretrain(out=str(tmp_path / "other"), save_every=-1, **small)
