"""Pretraining under SLURM, as ``srun`` starts it (docs/cluster.md): two processes that take their rank and world size
from SLURM's variables, and SIGUSR1 (``#SBATCH --signal=USR1@90``) that stops both at one step with
``interrupted.ckpt`` and exit status 75, for the job script to requeue the run and ``--resume auto`` to go on."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY
from mls.checkpoints.pretrained import read_checkpoint
from mls.train.resume import REQUEUE_STATUS, resolve_resume

WORLD = 2
STEPS_PER_EPOCH = TINY["num_images"] // (WORLD * TINY["batch_size"])  # 3: each rank takes half of each epoch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_env(rank: int, port: int) -> dict:
    """What ``srun --nodes=1 --ntasks-per-node=2`` gives task ``rank`` of job 4242 (and MASTER_ADDR/PORT, which
    docs/cluster.md's scripts export)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LOCAL_RANK", "RANK", "WORLD_SIZE"))}
    return {**env, "OMP_NUM_THREADS": "1", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "mls", "SLURM_NTASKS": "2",
            "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_PROCID": str(rank),
            "SLURM_LOCALID": str(rank), "SLURM_NODELIST": "localhost", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port)}


def srun(out: Path, log: Path, **options) -> list[subprocess.Popen]:
    """Both tasks of ``srun mls pretrain --devices 2 ...`` (DDP with gloo, on the CPU of a machine without GPUs)."""
    settings = {**TINY, "out": str(out), "devices": WORLD, **options}
    args = [sys.executable, "-m", "mls.cli", "pretrain", *(f"--{k.replace('_', '-')}={v}" for k, v in settings.items())]
    port, procs = free_port(), []
    for rank in range(WORLD):
        with open(f"{log}.{rank}", "wb") as err:
            procs.append(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err, env=slurm_env(rank, port)))
    return procs


def wait(procs: list[subprocess.Popen], log: Path, timeout: float = 300) -> list[int]:
    try:
        return [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()


@pytest.mark.slow
@pytest.mark.distributed
def test_two_slurm_tasks_train_as_two_ranks_and_sigusr1_stops_both_for_a_requeue(tmp_path):
    out, log = tmp_path / "run", tmp_path / "task"
    procs = srun(out, log, epochs=100)
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoints" / "epoch000.ckpt").exists():  # training is under way on both ranks
            assert all(p.poll() is None for p in procs), Path(f"{log}.0").read_text()[-3000:]
            assert time.monotonic() < deadline, "the run did not start"
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGUSR1)  # one task only: the other must stop at the same step
        codes = wait(procs, log, timeout=120)
    finally:
        for p in procs:
            p.kill()
    assert codes == [REQUEUE_STATUS] * WORLD, [Path(f"{log}.{r}").read_text()[-2000:] for r in range(WORLD)]
    interrupted = read_checkpoint(out / "checkpoints" / "interrupted.ckpt")
    step = interrupted["global_step"]
    assert step >= STEPS_PER_EPOCH
    assert interrupted["PretrainData"] == {"world_size": WORLD, "batch_size": TINY["batch_size"]}  # SLURM_NTASKS
    assert not list(out.rglob("hpc_ckpt_*.ckpt"))  # Lightning's own requeue is off
    assert resolve_resume("auto", out) == str(out / "checkpoints" / "interrupted.ckpt")

    # the requeued job: the same command with --resume auto goes on from the step it stopped at
    codes = wait(srun(out, log, epochs=100, resume="auto", max_steps=step + 2), log)
    assert codes == [0] * WORLD, Path(f"{log}.0").read_text()[-3000:]
    last = read_checkpoint(out / "checkpoints" / "last.ckpt")
    assert last["global_step"] == step + 2 and last["PretrainData"]["world_size"] == WORLD
