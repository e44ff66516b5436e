"""End-to-end pretraining: CLI, checkpoints and logs, resume, torchrun, bad input."""
import csv
import inspect
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import load_file

import mls.train.commands
from conftest import TINY, assert_resumed_like_straight
from mls import __version__
from mls.checkpoints.pretrained import load_pretrained, read_checkpoint
from mls.cli import main
from mls.train import pretrain
from mls.train.commands import pretrain_command
from mls.train.module import PretrainModule
from mls.train.run_record import write_config
from mls.train.settings import PretrainSettings


def tiny_args(out, **overrides):
    settings = {**TINY, "out": str(out), **overrides}
    return [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]


def metrics(out):
    (path,) = (Path(out) / "csv").glob("version_*/metrics.csv")
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_cli_pretrain_writes_checkpoint_and_logs_and_exports(tmp_path):
    main(["pretrain", *tiny_args(tmp_path / "run", epochs=1, max_steps=3)])
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    rows = metrics(tmp_path / "run")
    logged = {k for row in rows for k, v in row.items() if v}
    for name in ("train/loss", "train/loss_infonce", "train/loss_extra", "train/lr", "train/pos_sim",
                 "train/queue_fill", "train/label_precision", "train/images_per_sec"):
        assert name in logged
    assert any((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    model, info = load_pretrained(ckpt)
    assert info["model"]["queue_size"] == 24 and info["data"]["num_images"] == 48
    assert int(model.queue.count) == 24  # 3 steps x 8 keys

    main(["export", str(ckpt), "--format", "torchvision", "--out", str(tmp_path / "r18.pth")])
    net = torchvision.models.resnet18()
    missing, unexpected = net.load_state_dict(torch.load(tmp_path / "r18.pth"), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    assert torch.equal(net.layer4[1].conv2.weight, model.backbone_q.layer4[1].conv2.weight)


STEPS_PER_EPOCH = TINY["num_images"] // TINY["batch_size"]


class Crash(Exception):
    """Stands for a failure in the middle of an epoch."""


@pytest.mark.parametrize("stop, how", [(STEPS_PER_EPOCH, "max_steps"), (STEPS_PER_EPOCH, "crash"),
                                       (STEPS_PER_EPOCH + 2, "crash")],
                         ids=["epoch-end", "crash-after-last-batch", "crash-mid-epoch"])
@pytest.mark.slow
def test_resume_reproduces_an_uninterrupted_run(tmp_path, monkeypatch, stop, how):
    """2 epochs straight == stopped after `stop` steps and resumed: same weights and queues (CPU, up to 1e-6).

    A crash after a step leaves interrupted.ckpt. Stopped in the middle of epoch 1, the resumed run
    must go on with the images of that epoch it had not reached, in the same order and with the same
    crops, also when worker processes draw them.
    """
    common = dict(TINY, epochs=2, seed=3, workers=0 if how == "max_steps" else 2)
    steps_per_epoch = STEPS_PER_EPOCH
    straight = pretrain(out=str(tmp_path / "straight"), **common)
    if how == "max_steps":
        pretrain(out=str(tmp_path / "split"), max_steps=stop, **common)
    else:
        def crash(module, outputs, batch, batch_idx):
            if module.global_step == stop:
                raise Crash

        monkeypatch.setattr(PretrainModule, "on_train_batch_end", crash, raising=False)
        with pytest.raises(Crash):
            pretrain(out=str(tmp_path / "split"), **common)
        monkeypatch.undo()
        assert read_checkpoint(tmp_path / "split" / "checkpoints" / "interrupted.ckpt")["global_step"] == stop
    resumed = pretrain(out=str(tmp_path / "split"), resume="auto", **common)
    assert_resumed_like_straight(straight, resumed, 2 * steps_per_epoch)


@pytest.mark.distributed
def test_torchrun_two_process_ddp_smoke(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
           "-m", "mls.cli", "pretrain", *tiny_args(out, epochs=1, max_steps=2, devices=2, strategy="ddp")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    model, _ = load_pretrained(out / "checkpoints" / "last.ckpt")
    # 2 steps x 2 ranks x 8 keys, gathered from both ranks: 32 distinct images would overflow 24
    assert int(model.queue.count) == 24
    assert len(set(model.queue["index"].tolist())) == 24
    # rank zero alone writes the run's settings and its backbone: one summary names them
    assert (out / "config.yaml").is_file() and (out / "export" / "backbone.safetensors").is_file()
    assert (result.stdout + result.stderr).count("backbone: ") == 1


def write_images(folder: Path, n: int, size=(40, 40)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"img{i:03d}.jpg")


def test_missing_and_empty_folders_fail_before_training(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        pretrain(data=str(tmp_path / "missing"), out=str(tmp_path / "a"), **TINY)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image"):
        pretrain(data=str(tmp_path / "empty"), out=str(tmp_path / "b"), **TINY)
    assert not (tmp_path / "a" / "checkpoints").exists() and not (tmp_path / "b" / "checkpoints").exists()


@pytest.mark.slow
def test_odd_and_corrupt_images_are_read_or_skipped_and_counted(tmp_path):
    folder = tmp_path / "imgs"
    write_images(folder, 42)  # with the 6 below: 48 files, 6 full batches, every file read once
    Image.new("L", (50, 30), 128).save(folder / "gray.png")
    Image.new("RGBA", (30, 50), (255, 0, 0, 128)).save(folder / "rgba.png")
    Image.new("CMYK", (40, 40), (0, 255, 0, 0)).save(folder / "cmyk.jpg")
    Image.fromarray(np.arange(1600, dtype=np.uint16).reshape(40, 40) * 40).save(folder / "deep16.png")
    Image.new("RGB", (3, 5), (0, 0, 255)).save(folder / "tiny.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    pretrain(data=str(folder), out=str(tmp_path / "run"), epochs=1, **{**TINY, "queue_size": 16})
    rows = metrics(tmp_path / "run")
    skipped = [float(r["train/skipped_images"]) for r in rows if r.get("train/skipped_images")]
    assert skipped == [1.0]  # one unreadable file, skipped once in the epoch
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_too_many_unreadable_images_stop_the_run(tmp_path):
    folder = tmp_path / "imgs"
    write_images(folder, 30)
    for i in range(10):
        (folder / f"broken{i}.jpg").write_bytes(b"not an image")
    with pytest.raises(RuntimeError, match="unreadable"):
        pretrain(data=str(folder), out=str(tmp_path / "run"), epochs=1, max_failed_share=0.1,
                 **{**TINY, "queue_size": 16})


@pytest.mark.parametrize(
    "overrides, message",
    [({"queue_size": 48}, "queue_size"), ({"queue_size": 100}, "queue_size"), ({"topk": 24}, "topk"),
     ({"tau": 0.0}, "tau"), ({"momentum": 1.0}, "momentum"), ({"batch_size": 64}, "batch_size"),
     ({"arch": "vgg16"}, "arch"), ({"hue": 0.6}, "hue"), ({"grayscale_p": 1.5}, "grayscale_p")],
)
def test_impossible_settings_are_rejected_before_training(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        pretrain(out=str(tmp_path / "run"), epochs=1, **{**TINY, **overrides})
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_sigterm_saves_a_checkpoint_and_the_run_resumes_with_its_queues(tmp_path, stop):
    """SIGTERM (a cancelled job), or SIGUSR1 (SLURM's warning before the time limit, which also ends the run with
    exit status 75 for the job script to requeue it; docs/cluster.md)."""
    from mls.train.resume import REQUEUE_STATUS

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mls.cli", "pretrain", *tiny_args(out, epochs=100)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoints" / "epoch000.ckpt").exists():  # training is under way
            assert proc.poll() is None and time.monotonic() < deadline, "the run did not start"
            time.sleep(0.5)
        time.sleep(2)
        proc.send_signal(stop)
        proc.wait(timeout=120)
    finally:
        proc.kill()
    if stop == signal.SIGUSR1:
        assert proc.returncode == REQUEUE_STATUS, proc.stderr.read()[-3000:]
    interrupted = read_checkpoint(out / "checkpoints" / "interrupted.ckpt")
    step = interrupted["global_step"]
    assert step >= TINY["num_images"] // TINY["batch_size"]

    resumed = read_checkpoint(pretrain(out=str(out), resume="auto", epochs=100, max_steps=step + 1, **TINY))
    assert resumed["global_step"] == step + 1
    before, after = interrupted["state_dict"], resumed["state_dict"]
    ptr = int(before["model.queue.ptr"])
    written = [(ptr + i) % TINY["queue_size"] for i in range(TINY["batch_size"])]
    kept = [i for i in range(TINY["queue_size"]) if i not in written]
    for name in ("g", "z", "index", "box"):  # one more step rewrote one batch of rows, no other
        assert torch.equal(before[f"model.queue.field_{name}"][kept], after[f"model.queue.field_{name}"][kept])
    for name in ("g", "z", "box"):
        assert not torch.equal(before[f"model.queue.field_{name}"][written], after[f"model.queue.field_{name}"][written])
    # ... with the images an uninterrupted run trains on at that step, although SIGTERM usually lands
    # mid-epoch: the shuffled order of DistributedSampler (seed 0 + epoch), batch `step` of it.
    epoch, batch = divmod(step, STEPS_PER_EPOCH)
    order = torch.randperm(TINY["num_images"], generator=torch.Generator().manual_seed(epoch))
    expected = order[batch * TINY["batch_size"]:(batch + 1) * TINY["batch_size"]]
    assert after["model.queue.field_index"][written].tolist() == expected.tolist()


@pytest.mark.slow
def test_a_run_stopped_mid_epoch_resumes_only_with_the_same_split_of_its_epochs(tmp_path, monkeypatch):
    """Crashed after 8 steps (epoch 1 of 6 steps, in its middle): with another batch size each epoch's images
    would be dealt out otherwise, so going on from batch 2 of epoch 1 is refused; from an epoch's end it is not."""
    def crash(module, outputs, batch, batch_idx):
        if module.global_step == 8:
            raise Crash

    monkeypatch.setattr(PretrainModule, "on_train_batch_end", crash, raising=False)
    out = tmp_path / "run"
    with pytest.raises(Crash):
        pretrain(out=str(out), **dict(TINY, epochs=2))
    monkeypatch.undo()
    stopped = read_checkpoint(out / "checkpoints" / "interrupted.ckpt")
    assert stopped["PretrainData"] == {"world_size": 1, "batch_size": 8}
    with pytest.raises(ValueError, match="middle of an epoch at world size 1 and batch 8; this run has world size 1 and batch 4"):
        pretrain(out=str(out), resume="auto", **dict(TINY, epochs=2, batch_size=4))
    # the refused run left the checkpoint as it was: the right batch size still goes on from it
    assert read_checkpoint(out / "checkpoints" / "interrupted.ckpt")["PretrainData"] == stopped["PretrainData"]
    assert read_checkpoint(pretrain(out=str(out), resume="auto", **dict(TINY, epochs=2)))["global_step"] == 12
    ended = tmp_path / "ended"
    pretrain(out=str(ended), max_steps=6, **dict(TINY, epochs=2))  # the end of epoch 0
    pretrain(out=str(ended), resume="auto", **dict(TINY, epochs=2, batch_size=4))
    assert read_checkpoint(ended / "checkpoints" / "last.ckpt")["global_step"] == 6 + 12


def test_resume_auto_takes_the_checkpoint_that_got_furthest(tmp_path):
    from mls.train.resume import resolve_resume

    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    torch.save({"global_step": 120}, ckpts / "last.ckpt")
    time.sleep(0.05)
    torch.save({"global_step": 0}, ckpts / "interrupted.ckpt")  # a later run that died before restoring
    assert resolve_resume("auto", tmp_path) == str(ckpts / "last.ckpt")
    torch.save({"global_step": 130}, ckpts / "interrupted.ckpt")  # interrupted after more steps
    assert resolve_resume("auto", tmp_path) == str(ckpts / "interrupted.ckpt")
    assert resolve_resume("auto", tmp_path / "nothing-here") is None
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        resolve_resume(str(tmp_path / "missing.ckpt"), tmp_path)


@pytest.mark.slow
def test_mixed_precision_channels_last_and_half_queue_g_run(tmp_path):
    main(["pretrain", *tiny_args(tmp_path / "run", epochs=1, max_steps=2, precision="bf16-mixed",
                                 channels_last="true", queue_g_dtype="bfloat16")])
    model, _ = load_pretrained(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert model.queue["g"].dtype == torch.bfloat16 and int(model.queue.count) == 16


@pytest.mark.slow
def test_a_second_run_into_the_same_folder_neither_overwrites_nor_silently_resumes(tmp_path):
    first = pretrain(out=str(tmp_path), epochs=1, max_steps=2, **TINY)
    before = first.read_bytes()
    with pytest.raises(FileExistsError, match="--resume auto"):
        pretrain(out=str(tmp_path), epochs=1, max_steps=2, **TINY)
    assert first.read_bytes() == before
    # The mls executable says the same in one line, without a traceback, and exits with status 1.
    proc = subprocess.run([sys.executable, "-m", "mls.cli", "pretrain", *tiny_args(tmp_path, epochs=1, max_steps=2)],
                          capture_output=True, text=True, env={**os.environ, "MLS_TRACEBACK": ""})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("mls: error: ") and "--resume auto" in proc.stderr
    assert first.read_bytes() == before


@pytest.mark.slow
def test_presets_record_their_views_and_resume_refuses_other_data(tmp_path, caplog):
    """--data takes the recommended preset, named with its settings as resolved in the run's first line, and
    MoCo-v2's views (hue 0.1, grayscale 0.2), the demo neither; the data's fingerprint is recorded, and resuming
    on other images is refused before training."""
    caplog.set_level("INFO")
    folder = tmp_path / "imgs"
    write_images(folder, 24)
    out = tmp_path / "paper"
    main(["pretrain", "--data", str(folder), "--out", str(out), "--max-steps", "1", "--arch", "resnet18",
          "--image-size", "32", "--batch-size", "8", "--queue-size", "16", "--topk", "2", "--epochs", "1",
          "--workers", "0"])
    first = caplog.records[0].getMessage()  # before Lightning's own lines
    assert first.startswith("mls pretrain: preset 'recommended' (") and \
        "MLS: ResNet-18, 32 px, D 16, k 2, λ 0.25 × BCE (Eq. 9) balanced from epoch 2" in first
    hyper = read_checkpoint(out / "checkpoints" / "last.ckpt")["hyper_parameters"]
    assert hyper["view"]["hue"] == 0.1 and hyper["view"]["grayscale_p"] == 0.2
    assert hyper["data"]["fingerprint"].startswith("image folder: 24 images, names ")

    write_images(folder, 25)  # one image more: another data set
    with pytest.raises(ValueError, match="pretrained on other data: image folder: 24 images.*25 images"):
        pretrain(data=str(folder), out=str(out), resume="auto", max_steps=2, arch="resnet18", image_size=32,
                 batch_size=8, queue_size=16, topk=2, epochs=1, workers=0)

    demo = read_checkpoint(pretrain(out=str(tmp_path / "demo"), epochs=1, max_steps=1, **TINY))["hyper_parameters"]
    assert demo["view"]["hue"] == 0.0 and demo["view"]["grayscale_p"] == 0.0
    assert demo["data"]["fingerprint"] == "built-in scenes: 48 of 32 px, seed 0"


@pytest.mark.slow
def test_an_impossible_queue_is_refused_before_lightning_prints_anything(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mls.cli", "pretrain", *tiny_args(tmp_path, queue_size=48, epochs=1)],
                          capture_output=True, text=True, env={**os.environ, "MLS_TRACEBACK": ""})
    assert proc.returncode == 1 and proc.stderr.startswith("mls: error: ") and "queue_size" in proc.stderr
    assert "GPU available" not in proc.stderr + proc.stdout


def test_config_yaml_holds_every_option_and_reads_back_as_the_same_settings(tmp_path, monkeypatch):
    (tmp_path / "start" / "images").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "start")
    given = dict(data="images", topk=3, hue=0.25, precision="bf16-mixed", devices="0,1", lr=0.05, weight_decay=3e-5)
    settings = PretrainSettings.resolve(given)
    text = write_config(settings, tmp_path).read_text()
    assert text.startswith(f"# mls pretrain's settings as resolved by mls {__version__} (torch {torch.__version__})")
    options = set(inspect.signature(pretrain_command()).parameters) - {"out", "resume"}  # those of --help
    keys = {line.split(":")[0] for line in text.splitlines() if line and not line.startswith(("#", " ", "-"))}
    assert keys == options
    seen = {}

    def parsed(out, resume, preset, **options):
        seen.update(options, out=out, preset=preset)

    parsed.__doc__ = pretrain.__doc__  # the command's help is written from it
    monkeypatch.setattr(mls.train.commands, "pretrain", parsed)
    monkeypatch.chdir(tmp_path)  # another folder: the data's path must not depend on where the run starts
    main(["pretrain", "--config", str(tmp_path / "config.yaml"), "--out", "other"])
    assert seen.pop("out") == "other" and seen.pop("preset") == "recommended"
    again = PretrainSettings.resolve(seen, "recommended")
    assert again.values() == {**settings.values(), "data": str(tmp_path / "start" / "images")}
    assert (again.model.topk, again.view.hue, again.train.weight_decay, again.train.devices) == (3, 0.25, 3e-5, "0,1")


@pytest.mark.slow
def test_a_run_repeats_from_its_config_yaml_and_exports_its_backbone(tmp_path, monkeypatch, caplog):
    main(["pretrain", *tiny_args(tmp_path / "first", epochs=1, max_steps=2, seed=3, topk=3, momentum=0.9)])
    first = tmp_path / "first"
    assert "data: null" in (first / "config.yaml").read_text()
    model, _ = load_pretrained(first / "checkpoints" / "last.ckpt")
    exported = load_file(first / "export" / "backbone.safetensors")
    assert exported.keys() == {k for k in model.backbone_q.state_dict() if not k.startswith("fc.")}
    assert all(torch.equal(exported[k], v) for k, v in model.backbone_q.state_dict().items() if k in exported)
    assert f"backbone: {first / 'export' / 'backbone.safetensors'}" in caplog.text
    assert f"mls pretrain --config {first / 'config.yaml'} --out OTHER" in caplog.text

    main(["pretrain", "--config", str(first / "config.yaml"), "--out", str(tmp_path / "again")])
    rows, again = metrics(first), metrics(tmp_path / "again")
    steps = [row for row in rows if row.get("train/loss")]
    assert len(steps) == 2 and steps[0]["train/loss"] == again[0]["train/loss"]  # not the demo's 2,000 scenes
    assert [r["train/loss"] for r in again if r.get("train/loss")] == [r["train/loss"] for r in steps]

    def crash(*args, **kwargs):
        raise RuntimeError("crashed")

    monkeypatch.setattr(L.Trainer, "fit", crash)
    with pytest.raises(RuntimeError, match="crashed"):
        pretrain(out=str(tmp_path / "crashed"), epochs=1, **TINY)
    assert "num_images: 48" in (tmp_path / "crashed" / "config.yaml").read_text()
    assert not (tmp_path / "crashed" / "export").exists()
