"""The extra losses of Table 6, one registry entry each: ``--mls-loss NAME`` picks one.

An entry (``ExtraLoss``) holds everything the rest of mls reads about a loss: its name, the words the
run's first line and its summary use, the loss function (a pure function of the logits ``p`` and the
pseudo-labels ``y``, citing its equation), its gradient on ``p`` in closed form, split into the part from
the positive terms and the part from the negative terms (for the health measures: ``grad_extra_pos``,
``grad_extra_neg``), the keywords it takes from ``MLSConfig`` and its checks. The settings (choices and
``--help``), the model, the health measures and the summaries read ``EXTRA_LOSSES``; a new loss is one
``register_extra_loss`` call (docs/architecture.md, "Adding an extra loss").

In the gradients, ``ℓ`` is the loss of one query (the batch mean divides them by N); ``valid`` and the
means over "D" entries are those of ``mls.method.losses``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from mls.method.losses import bce, bce_pos, knn_softmax


def _no_options(config: Any) -> dict:
    return {}


@dataclass(frozen=True)
class ExtraLoss:
    """One extra loss: what ``--mls-loss NAME`` trains with, and how the run names and measures it.

    ``loss(logits, labels, tau, valid=..., **options)`` is the batch mean; ``logit_grads(logits, labels, tau,
    valid, **options)`` returns ``∂ℓ/∂p`` (N x D) of one query's loss from its positive and from its negative
    terms. ``options(config)`` gives both their keywords from the ``MLSConfig`` (e.g. ``balanced``: a keyword
    set to True is also named after ``words``); ``takes_bias``: the loss scores ``σ(p/τ + b)`` and takes
    ``bias`` (``--logit-bias``); ``check(config)`` raises a ``ValueError`` naming a setting the loss cannot take.
    """

    name: str
    words: str
    help: str
    loss: Callable[..., Tensor]
    logit_grads: Callable[..., tuple[Tensor, Tensor]]
    options: Callable[[Any], dict] = field(default=_no_options)
    takes_bias: bool = False
    check: Callable[[Any], None] | None = None

    def describe(self, config: Any) -> str:
        """How a run with ``config`` names its extra loss: "BCE (Eq. 9) balanced"."""
        return self.words + "".join(f" {key}" for key, value in self.options(config).items() if value is True)


EXTRA_LOSSES: dict[str, ExtraLoss] = {}
"""The registered extra losses, by the name the model and the command line use, in the order of ``--help``."""


def register_extra_loss(entry: ExtraLoss) -> ExtraLoss:
    """Add ``entry`` to ``EXTRA_LOSSES`` (a name registered twice is refused)."""
    if entry.name in EXTRA_LOSSES:
        raise ValueError(f"an extra loss named {entry.name!r} is registered already")
    EXTRA_LOSSES[entry.name] = entry
    return entry


def extra_loss_help() -> dict[str, str]:
    """Each registered loss's name and its words in ``--help``."""
    return {name: entry.help for name, entry in EXTRA_LOSSES.items()}


def _masks(logits: Tensor, labels: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The valid entries, the positive ones and the negative ones, as fp32 (N x D) masks."""
    mask = valid.to(torch.float32).reshape(-1, logits.shape[-1]).expand_as(logits)
    y = labels.float() * mask
    return mask, y, mask - y


def bce_logit_grads(logits: Tensor, labels: Tensor, tau: float, valid: Tensor, balanced: bool = False,
                    bias: Tensor | float = 0.0) -> tuple[Tensor, Tensor]:
    """Eq. 9 with ``x = p/τ + b``: ``∂ℓ/∂pᵢ = wᵢ (σ(xᵢ) − yᵢ)/τ`` with ``wᵢ = 1/D`` (one mean over the valid
    entries) or, balanced, ``1/k`` for positives and ``1/(D − k)`` for negatives."""
    mask, y, neg = _masks(logits, labels, valid)
    per_entry = (torch.sigmoid(logits.float() / tau + bias) - y) / tau
    if balanced:
        w_pos, w_neg = 1.0 / y.sum(1, keepdim=True).clamp(min=1), 1.0 / neg.sum(1, keepdim=True).clamp(min=1)
    else:
        w_pos = w_neg = 1.0 / mask.sum(1, keepdim=True).clamp(min=1)
    return per_entry * y * w_pos, per_entry * neg * w_neg


def bce_pos_logit_grads(logits: Tensor, labels: Tensor, tau: float, valid: Tensor,
                        bias: Tensor | float = 0.0) -> tuple[Tensor, Tensor]:
    """Eq. 15, the positive terms of Eq. 9 alone: ``∂ℓ/∂pᵢ = yᵢ (σ(xᵢ) − 1)/(τ·D)``; no negative part."""
    mask, y, _ = _masks(logits, labels, valid)
    per_entry = (torch.sigmoid(logits.float() / tau + bias) - y) / tau
    pos = per_entry * y * (1.0 / mask.sum(1, keepdim=True).clamp(min=1))
    return pos, torch.zeros_like(pos)


def knn_logit_grads(logits: Tensor, labels: Tensor, tau: float, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Eq. 10: ``∂ℓ/∂pᵢ = (sᵢ − yᵢ/k)/τ`` with ``s`` the softmax over the valid entries; its negative part is
    the softmax mass on the negatives. A query without positives has none."""
    mask, y, neg = _masks(logits, labels, valid)
    s = torch.softmax((logits.float() / tau).masked_fill(mask == 0, float("-inf")), dim=1).nan_to_num(0.0)
    n_pos = y.sum(1, keepdim=True)
    per_entry = torch.where(n_pos > 0, s - y / n_pos.clamp(min=1), 0.0) / tau
    return per_entry * y, per_entry * neg


register_extra_loss(ExtraLoss("bce", "BCE (Eq. 9)", "Eq. 9, MLS", bce, bce_logit_grads,
                              options=lambda config: {"balanced": config.bce_balanced}, takes_bias=True))
register_extra_loss(ExtraLoss("bce_pos", "BCE-pos", "supplement Eq. 15", bce_pos, bce_pos_logit_grads,
                              takes_bias=True))
register_extra_loss(ExtraLoss("knn", "k-NN softmax", "k-NN softmax, supplement Eq. 10", knn_softmax,
                              knn_logit_grads))
