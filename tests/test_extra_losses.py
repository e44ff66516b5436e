"""The extra losses' registry (``mls.method.extra_losses``): each entry's gradient split is its loss's
gradient, and a loss registered from outside reaches --help, a run, its first line and summary, and the
health columns with no other edit."""
import csv
import logging

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY
from mls.method.extra_losses import EXTRA_LOSSES, ExtraLoss, register_extra_loss
from mls.method.settings import MLSConfig


def brier(logits, labels, tau, valid=None):
    """A toy loss: the squared error of σ(p/τ) to y, averaged over the valid entries and the batch."""
    mask = torch.ones_like(logits, dtype=torch.bool) if valid is None else valid.reshape(-1, logits.shape[-1])
    err = (torch.sigmoid(logits.float() / tau) - labels.float()) ** 2 * mask
    return (err.sum(1) / mask.sum(1).clamp(min=1)).mean()


def brier_logit_grads(logits, labels, tau, valid):
    """``∂ℓ/∂pᵢ = 2 (sᵢ − yᵢ) sᵢ (1 − sᵢ) / (τ·D)`` with ``s = σ(p/τ)``, from the positive and the negative entries."""
    mask = valid.float().reshape(-1, logits.shape[-1]).expand_as(logits)
    s, y = torch.sigmoid(logits.float() / tau), labels.float() * mask
    per_entry = 2 * (s - y) * s * (1 - s) / tau / mask.sum(1, keepdim=True).clamp(min=1)
    return per_entry * y, per_entry * (mask - y)


@pytest.fixture
def toy_loss():
    entry = register_extra_loss(ExtraLoss("brier", "Brier score", "squared error of σ(p/τ), a toy", brier,
                                          brier_logit_grads))
    yield entry
    del EXTRA_LOSSES["brier"]


def logits_and_labels(n=5, d=24, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(n, 8, generator=g), dim=1)
    bank = F.normalize(torch.randn(d, 8, generator=g), dim=1)
    valid = torch.ones(d, dtype=torch.bool)
    valid[-4:] = False
    labels = torch.zeros(n, d)
    labels.scatter_(1, torch.rand(n, d - 4, generator=g).topk(k, dim=1).indices, 1.0)
    return q @ bank.T, labels, valid


@pytest.mark.parametrize("name", ["bce", "bce_pos", "knn", "brier"])
def test_each_gradient_split_adds_up_to_its_loss_gradient_and_splits_by_label(name, toy_loss):
    logits, y, valid = logits_and_labels(seed=3)
    entry, tau = EXTRA_LOSSES[name], 0.2
    p = logits.clone().requires_grad_(True)
    entry.loss(p, y, tau, valid=valid).backward()
    pos, neg = entry.logit_grads(logits, y, tau, valid)
    torch.testing.assert_close(pos + neg, p.grad * len(logits))  # per query: the batch mean divides by N
    assert (pos * (1 - y)).abs().sum() == 0 and (neg * y).abs().sum() == 0


def test_an_unknown_or_twice_registered_loss_is_refused(toy_loss):
    with pytest.raises(ValueError, match="mls_loss: must be one of bce, bce_pos, knn, brier"):
        MLSConfig(mls_loss="focal")
    with pytest.raises(ValueError, match="registered already"):
        register_extra_loss(toy_loss)
    with pytest.raises(ValueError, match=r"logit_bias: applies to the sigmoid losses \(bce, bce_pos\)"):
        MLSConfig(mls_loss="brier", logit_bias="fixed")


def test_a_registered_loss_reaches_help_a_run_its_summary_and_the_health_columns(toy_loss, tmp_path, capsys, caplog):
    from mls.cli import main
    from mls.train import pretrain

    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    assert "brier (squared error of σ(p/τ), a toy)" in " ".join(capsys.readouterr().out.split())

    caplog.set_level(logging.INFO)
    pretrain(out=str(tmp_path), mls_loss="brier", extra_start_epoch=0, epochs=1, max_steps=2, **TINY)
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "λ 0.25 × Brier score from the first step" in logged  # the run's first line
    assert ", Brier score " in logged.split("done: ")[1]  # the summary's loss terms
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row.get("health/grad_extra_neg")]
    assert float(rows[-1]["health/grad_extra_neg"]) > 0  # the first step has an empty queue: 0

    from mls.study.grids import BUDGETS, grid_cells

    cells = grid_cells("table6", BUDGETS["tiny"])  # the study's Table 6 grid gains a row
    assert list(cells)[2:] == ["knn", "bce_pos", "bce", "brier"] and cells["brier"] == {"mls_loss": "brier"}
