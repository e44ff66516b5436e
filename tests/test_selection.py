"""Pseudo-label selection against a brute-force search."""
import math

import torch

from mls.method.selection import select_topk


def brute_topk(x, bank, k, valid):
    """Top-k rows of ``bank`` by cosine similarity to each row of ``x``, by sorting Python lists."""
    out = []
    for row in x.tolist():
        sims = []
        for j, entry in enumerate(bank.tolist()):
            if not valid[j]:
                continue
            dot = sum(a * b for a, b in zip(row, entry))
            norm = math.sqrt(sum(a * a for a in row)) * math.sqrt(sum(b * b for b in entry))
            sims.append((dot / norm, j))
        out.append({j for _, j in sorted(sims, reverse=True)[:k]})
    return out


def test_select_topk_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    x, bank = torch.randn(5, 6, generator=g), torch.randn(30, 6, generator=g) * torch.rand(30, 1, generator=g) * 3
    valid = torch.rand(30, generator=g) > 0.3
    labels = select_topk(x, bank, 4, valid)
    assert labels.shape == (5, 30)
    assert [set(torch.nonzero(row).flatten().tolist()) for row in labels] == brute_topk(x, bank, 4, valid)


def test_invalid_entries_are_never_selected():
    x = torch.randn(3, 4)
    bank = torch.randn(10, 4)
    bank[:5] = x[0]  # the most similar entries possible, but not written yet
    valid = torch.arange(10) >= 5
    labels = select_topk(x, bank, 3, valid)
    assert labels[:, :5].sum() == 0
    assert (labels.sum(1) == 3).all()


def test_fewer_valid_entries_than_k_selects_all_valid():
    valid = torch.tensor([True, True, False, False, False])
    labels = select_topk(torch.randn(2, 3), torch.randn(5, 3), 4, valid)
    assert labels.tolist() == [[1, 1, 0, 0, 0]] * 2


def test_k_zero_selects_nothing():
    assert select_topk(torch.randn(2, 3), torch.randn(5, 3), 0).sum() == 0
