"""The losses of MLS and its baselines, as pure functions.

Notation follows the paper: ``q = z1`` is the query embedding, ``k = z2`` its key,
``Q_z`` the queue of keys, ``p = q·Q_zᵀ`` the ``logits`` (N x D), ``y`` the binary
pseudo-labels (N x D) and ``tau`` the temperature. ``valid`` is a boolean mask (D,), or
(N x D) for one mask per query, of the queue entries that take part: the others (never
written, or left out on purpose) count in no loss, and every mean over "D" entries runs
over the valid ones only. All losses are computed in fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _valid_mask(logits: Tensor, valid: Tensor | None) -> Tensor:
    """The mask of entries that take part, (1 x D) or (N x D), from ``valid`` (D,), (N x D) or None (all)."""
    if valid is None:
        return torch.ones(1, logits.shape[-1], dtype=torch.bool, device=logits.device)
    return valid.to(device=logits.device, dtype=torch.bool).reshape(-1, logits.shape[-1])


def infonce(q: Tensor, k: Tensor, queue_z: Tensor, tau: float, valid: Tensor | None = None) -> Tensor:
    """MoCo-v2's InfoNCE: cross-entropy over ``[q·k+, q·Q_zᵀ] / tau`` with the positive at index 0."""
    q = q.float()
    return infonce_from_logits((q * k.float()).sum(dim=1), q @ queue_z.float().T, tau, valid)


def infonce_from_logits(l_pos: Tensor, l_neg: Tensor, tau: float, valid: Tensor | None = None) -> Tensor:
    """InfoNCE from ``l_pos = q·k+`` (N,) and ``l_neg = q·Q_zᵀ`` (N x D), so ``p`` is computed once."""
    l_neg = l_neg.float().masked_fill(~_valid_mask(l_neg, valid), float("-inf"))  # the positive always counts
    logits = torch.cat([l_pos.float()[:, None], l_neg], dim=1) / tau
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


def _scaled(logits: Tensor, tau: float, bias: Tensor | float = 0.0) -> Tensor:
    """``p/τ + b`` in fp32, in one pass over N x D (two only when ``b`` is a tensor)."""
    x = logits.float() * (1.0 / tau)
    return x if isinstance(bias, float) and bias == 0.0 else x + bias


def _binary_terms(logits: Tensor, tau: float, bias: Tensor | float = 0.0) -> tuple[Tensor, Tensor]:
    """``log σ(p/τ + b)`` and ``log(1 − σ(p/τ + b))``, computed stably."""
    x = _scaled(logits, tau, bias)
    return F.logsigmoid(x), F.logsigmoid(-x)


def bce(logits: Tensor, labels: Tensor, tau: float, valid: Tensor | None = None, balanced: bool = False,
        bias: Tensor | float = 0.0) -> Tensor:
    """Eq. 9: ``−(1/D) Σ_i [y_i log σ(p_i/τ) + (1−y_i) log(1 − σ(p_i/τ))]``, averaged over the batch.

    Two departures the paper does not have, both off by default:
    ``balanced=True`` averages the positive and the negative terms separately and sums the two
    means, so that the ~D/k times more negatives do not drown the positives. ``bias`` scores
    ``σ(p/τ + b)``: started at the prior log-odds of a positive, ``log(k/(D−k))``, it keeps the one
    mean over D while the negatives start near zero loss (as sigmoid losses over millions of
    negatives do).
    """
    mask = _valid_mask(logits, valid).float()
    x, y = _scaled(logits, tau, bias), labels.float()
    if balanced:
        per_entry = F.binary_cross_entropy_with_logits(x, y, reduction="none")  # one fused pass over N x D
        pos, neg = y * mask, mask - y * mask
        pos_mean = (per_entry * pos).sum(1) / pos.sum(1).clamp(min=1)
        return (pos_mean + (per_entry * neg).sum(1) / neg.sum(1).clamp(min=1)).mean()
    per_entry = F.binary_cross_entropy_with_logits(x, y, weight=mask.expand_as(x), reduction="none")
    return (per_entry.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()


def bce_pos(logits: Tensor, labels: Tensor, tau: float, valid: Tensor | None = None,
            bias: Tensor | float = 0.0) -> Tensor:
    """Eq. 15: ``−(1/D) Σ_i y_i log σ(p_i/τ)`` — BCE without its negative term (``bias`` as in ``bce``)."""
    mask = _valid_mask(logits, valid).float()
    log_pos, _ = _binary_terms(logits, tau, bias)
    return -((labels.float() * mask * log_pos).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()


def knn_softmax(logits: Tensor, labels: Tensor, tau: float, valid: Tensor | None = None) -> Tensor:
    """Eq. 10: ``−(1/N_pos) Σ_{i∈pos} log(exp(p_i/τ) / Σ_{k∈Q_z} exp(p_k/τ))``, averaged over the batch.

    The softmax runs over the valid queue entries; a query without positives adds 0.
    """
    mask = _valid_mask(logits, valid)
    x = (logits.float() / tau).masked_fill(~mask, float("-inf"))
    log_prob = torch.log_softmax(x, dim=1).masked_fill(~mask, 0.0)
    y = labels.float() * mask
    n_pos = y.sum(dim=1)
    per_query = -(y * log_prob).sum(dim=1) / n_pos.clamp(min=1)
    return per_query.mean()
