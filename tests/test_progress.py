"""``--progress``: Lightning's bar on a terminal, plain lines where stdout is a file (no carriage returns), or none."""
import io
import os
import re
import subprocess
import sys

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from conftest import TINY
from mls.progress import ProgressLines, progress_callbacks, progress_mode


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_auto_is_a_bar_on_a_terminal_and_lines_elsewhere():
    assert progress_mode("auto", _Terminal()) == "bar" and progress_mode("auto", io.StringIO()) == "lines"
    assert progress_mode("lines", _Terminal()) == "lines" and progress_mode("bar", io.StringIO()) == "bar"
    assert progress_callbacks("off") == []
    assert [type(c) for c in progress_callbacks("lines")] == [ProgressLines]


class _Regression(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _Clock(L.Callback):
    """20 s pass with each batch."""

    def __init__(self):
        self.now = 0.0

    def on_train_batch_end(self, *args):
        self.now += 20.0


def test_lines_come_every_30_seconds_and_at_each_epochs_end(capsys):
    """2 epochs of 3 batches, 20 s each: a line after batches 2 (40 s since the start), 3 (the epoch's end), 5 (40 s
    since the last line) and 6 (the end); none when training ends on a step already shown."""
    clock = _Clock()
    lines = ProgressLines(every=30.0, clock=lambda: clock.now)
    trainer = L.Trainer(max_epochs=2, callbacks=[clock, lines], logger=False, enable_checkpointing=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(_Regression(), DataLoader(TensorDataset(torch.randn(6, 2)), batch_size=2))
    out = capsys.readouterr().out
    printed = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert [re.sub(r": loss=[-0-9.e]+$", "", line) for line in printed] == [
        "epoch 1/2, batch 2/3, step 2, 0:00:40", "epoch 1/2, batch 3/3, step 3, 0:01:00",
        "epoch 2/2, batch 2/3, step 5, 0:01:40", "epoch 2/2, batch 3/3, step 6, 0:02:00"]
    assert all(re.search(r": loss=[-0-9.e]+$", line) for line in printed) and "\r" not in out


def run_pretraining(tmp_path, *options: str) -> str:
    """``mls pretrain`` (2 tiny epochs) as a cluster job runs it: stdout and stderr into one file; what it wrote."""
    args = [f"--{k.replace('_', '-')}={v}" for k, v in {**TINY, "epochs": 2, "out": tmp_path / "run"}.items()]
    log = tmp_path / "job.log"
    with open(log, "wb") as f:
        subprocess.run([sys.executable, "-m", "mls.cli", "pretrain", *args, *options], stdout=f, stderr=subprocess.STDOUT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True, timeout=600)
    return log.read_bytes().decode()


@pytest.mark.slow
def test_a_job_writing_to_a_file_gets_progress_lines_without_carriage_returns(tmp_path):
    text = run_pretraining(tmp_path)
    assert "\r" not in text
    assert re.search(r"^epoch 1/2, batch 6/6, step 6, \d+:\d\d:\d\d: loss=[0-9.]+$", text, re.M)
    assert re.search(r"^epoch 2/2, batch 6/6, step 12, ", text, re.M)
    assert "done: 12 steps, 2 epochs" in text  # the summary as before


@pytest.mark.slow
def test_progress_off_prints_none(tmp_path):
    text = run_pretraining(tmp_path, "--progress", "off")
    assert "\r" not in text and not re.search(r"^epoch \d+/\d+, batch", text, re.M) and "done: 12 steps, 2 epochs" in text
