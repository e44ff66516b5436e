"""Transfer and fine-tuning runs that resume: killed with SIGKILL mid-way and resumed, a set of runs reaches the
scores of a set that never stopped, and its finished runs are read back rather than run again."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mls.data.synthetic import write_coco
from mls.eval.commands import finetune
from mls.train.resume import RESULT, RUN_KEY, check_same_run, run_of_set
from mls.transfer.commands import detect

# 4 images in batches of 2: 2 iterations an epoch, so the checkpoints of --save-every 3 fall mid-epoch (3, 6) and
# the last one (8) is the end's; two training sizes and proposal sampling: each iteration draws random numbers
DETECT = dict(format="coco", runs=2, max_iters=8, steps=[6], warmup_iters=2, batch_size=2, lr=0.01,
              train_sizes=[48, 64], image_size=64, max_size=64, fpn_channels=16, rois_per_image=32, arch="resnet18",
              small_stem=False, workers=0, accelerator="cpu", save_every=3)
# 32 synthetic images in batches of 8: 4 steps an epoch; --save-every 1 writes last.ckpt at each epoch's end
FINETUNE = dict(arch="resnet18", small_stem=True, image_size=32, synthetic_images=32, workers=0, epochs=3,
                batch_size=8, runs=2, save_every=1)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def one_thread():
    """The runs made in this process use one thread, as the killed runs (ENV) do: the thread count changes the
    last digits of a CPU run, and the tests compare scores exactly."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cli(command: list[str], options: dict) -> list[str]:
    """``python -m mls.cli COMMAND --option value ...``."""
    args = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    return [sys.executable, "-m", "mls.cli", *command, *args]


def kill_when(proc: subprocess.Popen, written: Path, log: Path, timeout: float = 300) -> None:
    """SIGKILL ``proc`` as soon as ``written`` exists: no handler runs, no interrupted.ckpt is written."""
    deadline = time.monotonic() + timeout
    try:
        while not written.exists():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the run did not get there in time"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def step_of(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


@pytest.mark.slow
def test_a_detection_set_killed_mid_run_resumes_to_the_scores_of_an_uninterrupted_set(tmp_path):
    """Killed in the middle of its second run (first checkpoint at iteration 3, in the middle of an epoch), the set
    resumes: run 0 is read back untouched, run 1 goes on from iteration 3 with the same weights, optimiser,
    schedule, data order and random draws, and the scores are equal to the last digit on CPU."""
    write_coco(tmp_path / "coco", num_images=4, image_size=64, seed=0)
    data, stopped, whole = str(tmp_path / "coco"), tmp_path / "stopped", tmp_path / "whole"
    log = tmp_path / "stopped.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(cli(["transfer", "detect"], {"data": data, "out": stopped, **DETECT}),
                                stdout=subprocess.DEVNULL, stderr=err, env=ENV)
    kill_when(proc, stopped / "run1" / "checkpoints" / "last.ckpt", log)
    assert not (stopped / "results.json").exists() and not (stopped / "run1" / RESULT).exists()
    assert step_of(stopped / "run0" / "checkpoints" / "last.ckpt") == 8  # the end, written though 8 % 3 != 0
    first = {p: p.stat().st_mtime_ns for p in (stopped / "run0").rglob("*") if p.is_file()}
    assert 3 <= step_of(stopped / "run1" / "checkpoints" / "last.ckpt") < 8

    with pytest.raises(FileExistsError, match="pass --resume auto"):  # a fresh set over it is refused
        detect(data=data, out=str(stopped), **DETECT)
    resumed = detect(data=data, out=str(stopped), resume="auto", **DETECT)
    assert {p: p.stat().st_mtime_ns for p in (stopped / "run0").rglob("*") if p.is_file()} == first  # read back
    assert resumed["per_run"] == detect(data=data, out=str(whole), **DETECT)["per_run"]
    weights = [torch.load(out / "run1" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
               for out in (stopped, whole)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[1])


@pytest.mark.slow
def test_a_finetuning_set_killed_mid_run_resumes_to_the_scores_of_an_uninterrupted_set(tmp_path):
    """``mls eval finetune`` killed after the first epoch of its first run goes on from that epoch's checkpoint and
    reaches the uninterrupted set's test mAP exactly (CPU, one thread)."""
    stopped, whole, log = tmp_path / "stopped", tmp_path / "whole", tmp_path / "stopped.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(cli(["eval", "finetune"], {"out": stopped, **FINETUNE}), stdout=subprocess.DEVNULL,
                                stderr=err, env=ENV)
    kill_when(proc, stopped / "run0" / "checkpoints" / "last.ckpt", log)
    assert step_of(stopped / "run0" / "checkpoints" / "last.ckpt") < 3 * 4 and not (stopped / "run0" / RESULT).exists()
    resumed = finetune(out=str(stopped), resume="auto", **FINETUNE)
    uninterrupted = finetune(out=str(whole), **FINETUNE)
    assert resumed["metrics"] == uninterrupted["metrics"]
    assert resumed["per_class_ap"] == uninterrupted["per_class_ap"]


def test_a_finished_run_of_a_set_is_read_back_and_a_fresh_one_over_it_refused(tmp_path):
    calls = []

    def train(ckpt_path):
        calls.append(ckpt_path)
        return {"AP": 12.5}

    run = {"seed": 0, "settings": {"lr": 0.02}}
    assert run_of_set(tmp_path, None, run, train) == {"AP": 12.5} and calls == [None]
    assert torch.load(tmp_path / RESULT, weights_only=True) == {"AP": 12.5}
    assert run_of_set(tmp_path, "auto", run, train) == {"AP": 12.5} and calls == [None]  # not trained again
    assert run_of_set(tmp_path, "auto", run, train, first=False) is None  # only the first process reports
    with pytest.raises(FileExistsError, match="holds a finished run"):
        run_of_set(tmp_path, None, run, train)


def test_a_run_goes_on_only_from_a_checkpoint_of_the_same_settings(tmp_path):
    run = {"seed": 1, "dataset": "voc07", "settings": {"max_iters": 24000, "lr": 0.02}}
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    torch.save({"global_step": 5, "optimizer_states": [], RUN_KEY: run}, ckpts / "last.ckpt")
    check_same_run(str(ckpts / "last.ckpt"), run)
    other = {**run, "seed": 2, "settings": {"max_iters": 24000, "lr": 0.01}}
    with pytest.raises(ValueError, match=r"other settings \(seed, settings\)"):
        check_same_run(str(ckpts / "last.ckpt"), other)
    torch.save({"global_step": 5, "optimizer_states": []}, ckpts / "pretrained.ckpt")  # no run recorded
    with pytest.raises(ValueError, match="not a checkpoint of a transfer or fine-tuning run"):
        check_same_run(str(ckpts / "pretrained.ckpt"), run)
    # a folder holding checkpoints but no result: without --resume the run is refused before any training
    with pytest.raises(FileExistsError, match="pass --resume auto"):
        run_of_set(tmp_path, None, run, lambda ckpt: pytest.fail("trained"))
