"""Checkpoint files that cannot be used: every command that reads one says so in one line, naming the file.

Truncated, empty and foreign files for ``export``, ``eval --weights``, ``visualize neighbors`` and
``pretrain --resume``; ``--resume auto`` past a damaged ``last.ckpt``; data that is not the checkpoint's.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, fill_queue, tiny, tiny_checkpoint
from mls.checkpoints.pretrained import UnreadableCheckpoint, read_checkpoint
from mls.train import pretrain
from mls.train.resume import resolve_resume

# Runs `mls` (mls.cli.console, as the executable does) once per argument list in ONE fresh interpreter,
# importing torch and Lightning once; each run's stderr is followed by a line `<<exit CODE>>`.
DRIVER = """
import json, sys, traceback
from mls.cli import console
for args in json.loads(sys.argv[1]):
    sys.argv = ["mls", *args]
    try:
        console()
        code = 0
    except SystemExit as stop:  # what the interpreter does with sys.exit("message")
        code = stop.code if isinstance(stop.code, int) else 1
        if not isinstance(stop.code, int):
            print(stop.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 99
    print(f"<<exit {code}>>", file=sys.stderr, flush=True)
"""


def mls_runs(*runs: list[str]) -> list[tuple[int, str]]:
    """(exit status, stderr) of ``mls ARGS`` for each argument list, with ``MLS_TRACEBACK`` unset."""
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(runs)], capture_output=True, text=True,
                          env={**os.environ, "MLS_TRACEBACK": ""}, timeout=300)
    pieces = re.split(r"<<exit (-?\d+)>>\n", proc.stderr)  # text, code, text, code, ..., rest
    assert len(pieces) == 2 * len(runs) + 1, proc.stderr[-3000:]
    return [(int(code), text) for text, code in zip(pieces[0::2], pieces[1::2])]


def assert_one_line_error(code: int, stderr: str, *words: str) -> None:
    assert code == 1, stderr[-2000:]
    assert "Traceback" not in stderr and stderr.startswith("mls: error: "), stderr[-2000:]
    assert stderr.count("\n") == 1, stderr
    for word in words:
        assert word in stderr, stderr


def bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """A truncated pretraining checkpoint, an empty file and a foreign one, with what the error must say."""
    good = tmp_path / "good.ckpt"
    tiny_checkpoint(good)
    truncated, empty, foreign = tmp_path / "truncated.ckpt", tmp_path / "empty.ckpt", tmp_path / "notes.ckpt"
    data = good.read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    empty.write_bytes(b"")
    foreign.write_text("these are my notes, not a checkpoint\n")
    return {"truncated": (truncated, "truncated"), "empty": (empty, "empty"),
            "foreign": (foreign, "not a PyTorch checkpoint")}


def test_read_checkpoint_names_the_file_and_what_is_wrong(tmp_path):
    for path, reason in bad_files(tmp_path).values():
        with pytest.raises(UnreadableCheckpoint, match=reason) as caught:
            read_checkpoint(path)
        assert str(path) in str(caught.value) and "\n" not in str(caught.value)
        assert isinstance(caught.value, ValueError)


COMMANDS = {
    "export": lambda path, tmp: ["export", str(path), "--out", str(tmp / "out.pth")],
    "eval": lambda path, tmp: ["eval", "knn", "--weights", str(path), "--synthetic-images", "16", "--runs", "1",
                               "--workers", "0", "--out", str(tmp / "knn")],
    "visualize": lambda path, tmp: ["visualize", "neighbors", "--checkpoint", str(path), "--out", str(tmp / "nn.png")],
    "resume": lambda path, tmp: ["pretrain", "--resume", str(path), "--out", str(tmp / "run"),
                                 *[f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]],
}


@pytest.mark.slow
def test_truncated_and_foreign_files_are_refused_in_one_line_by_every_command(tmp_path):
    files = bad_files(tmp_path)
    cases = [(command, *files[kind]) for command in COMMANDS for kind in ("truncated", "foreign")]
    results = mls_runs(*[COMMANDS[command](path, tmp_path) for command, path, _ in cases])
    for (_command, path, reason), (code, stderr) in zip(cases, results):
        assert_one_line_error(code, stderr, str(path), reason)
    assert not (tmp_path / "run").exists() and not (tmp_path / "knn").exists()


def test_resume_refuses_exported_weights_before_training(tmp_path):
    weights = tmp_path / "r18.pth"
    torch.save(tiny_checkpoint(tmp_path / "m.ckpt").backbone_q.state_dict(), weights)
    with pytest.raises(ValueError, match="not a checkpoint of `mls pretrain`"):
        pretrain(out=str(tmp_path / "a"), resume=str(weights), **TINY)
    with pytest.raises(ValueError, match="not the training state"):
        pretrain(out=str(tmp_path / "b"), resume=str(tmp_path / "m.ckpt"), **TINY)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_resume_auto_skips_an_unreadable_checkpoint_for_the_furthest_readable_one(tmp_path, caplog):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    torch.save({"global_step": 12}, ckpts / "epoch001.ckpt")
    torch.save({"global_step": 6}, ckpts / "epoch000.ckpt")
    torch.save({"global_step": 3}, ckpts / "interrupted.ckpt")
    (ckpts / "last.ckpt").write_bytes((ckpts / "epoch001.ckpt").read_bytes()[:100])  # damaged
    with caplog.at_level("INFO"):
        assert resolve_resume("auto", tmp_path) == str(ckpts / "epoch001.ckpt")
    skipped = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(skipped) == 1 and "last.ckpt" in skipped[0] and "truncated" in skipped[0]
    for name in ("epoch000", "epoch001", "interrupted"):
        (ckpts / f"{name}.ckpt").write_text("gone")
    with pytest.raises(ValueError, match="none of the 4 checkpoints"):
        resolve_resume("auto", tmp_path)


@pytest.mark.slow
def test_resume_auto_trains_on_past_a_corrupt_last_ckpt(tmp_path):
    out = tmp_path / "run"
    pretrain(out=str(out), epochs=3, max_steps=7, **TINY)  # epoch000.ckpt at step 6, last.ckpt at step 7
    last = out / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    resumed = read_checkpoint(pretrain(out=str(out), resume="auto", epochs=3, max_steps=8, **TINY))
    assert resumed["global_step"] == 8  # from epoch000.ckpt (step 6), two steps on


def write_images(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(n)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(folder / f"img{i:03d}.png")
    return folder


@pytest.mark.slow
def test_neighbors_refuses_other_data_than_the_checkpoints_unless_forced(tmp_path):
    from mls.checkpoints.pretrained import save_pretrained
    from mls.data.images import ImageFolderSource
    from mls.viz.neighbors import neighbors

    trained, other = write_images(tmp_path / "trained", 34), write_images(tmp_path / "other", 35)
    model = tiny(queue_size=32, store_g=True)
    fill_queue(model)  # indices 0..31
    data = {"data": str(trained), "annotations": None, "num_images": 34, "image_size": 32, "seed": 0}
    save_pretrained(tmp_path / "new.ckpt", model, {"data": {**data, "fingerprint": ImageFolderSource(trained).fingerprint()}})
    save_pretrained(tmp_path / "old.ckpt", model, {"data": data})  # before fingerprints: not checked
    draw = dict(out=str(tmp_path / "nn.png"), queries=1, k=2, tile=32)
    with pytest.raises(ValueError, match="is not the data set") as caught:
        neighbors(str(tmp_path / "new.ckpt"), data=str(other), **draw)
    message = str(caught.value)
    assert "35 images" in message and "34 images" in message and "--force" in message and "\n" not in message
    assert not (tmp_path / "nn.png").exists()
    neighbors(str(tmp_path / "new.ckpt"), data=str(other), force=True, **draw)
    neighbors(str(tmp_path / "old.ckpt"), data=str(other), **draw)
    neighbors(str(tmp_path / "new.ckpt"), **draw)  # its own data


def test_help_writes_options_with_dashes(capsys):
    from mls.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["pretrain", "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert "--batch-size BATCH_SIZE" in text and "--queue-size" in text and "--grayscale-p" in text
    assert not re.search(r"--[a-z0-9]+_[a-z]", text)


def test_the_summary_gives_the_last_epochs_loss_terms_precision_and_next_commands(tmp_path):
    from types import SimpleNamespace

    from mls.train.settings import PretrainSettings
    from mls.train.summary import run_summary

    logs = tmp_path / "csv" / "version_0"
    logs.mkdir(parents=True)
    (logs / "metrics.csv").write_text(
        "epoch,step,train/extra_weight,train/images_per_sec,train/label_precision,train/loss,train/loss_extra,"
        "train/loss_infonce,train/skipped_images\n"
        "0,0,0.0,,nan,9.0,9.0,9.0,\n"
        "1,10,0.5,100,0.5,3.0,1.0,2.5,\n"
        "1,11,0.5,100,0.7,5.0,3.0,3.5,\n"
        "1,11,,,,,,,0.0\n")
    from lightning.pytorch.loggers import CSVLogger

    trainer = SimpleNamespace(loggers=[None, CSVLogger(tmp_path, name="csv", version=0)], global_step=12, current_epoch=2)
    last = tmp_path / "checkpoints" / "last.ckpt"
    text = run_summary(trainer, PretrainSettings.resolve({}, "demo"), tmp_path, last)
    assert "12 steps, 2 epochs" in text
    assert "loss 4.000 (InfoNCE 3.000, BCE (Eq. 9) balanced 2.000 at mean λ 0.50), pseudo-label precision 0.600" in text
    assert f"mls visualize neighbors --checkpoint {last}" in text and f"mls eval knn --weights {last}" in text
    assert f"mls plot {tmp_path}" in text
