"""Pseudo-label selection: each query's top-k neighbours in a queue are its positives.

MLS selects with the backbone feature ``g1`` against ``Q_g`` (main paper Fig. 3); the
Table 7 ablation selects with ``z1`` against ``Q_z``. The training step ranks the similarities it
already holds with ``topk_indices`` and ``labels_from_indices``; ``select_topk`` is the same selection
from raw features, for use outside a step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def cosine_similarity(x: Tensor, bank: Tensor) -> Tensor:
    """``s = x̂·Q̂ᵀ`` (N x D) in fp32, rows of both L2-normalised."""
    return F.normalize(x.float(), dim=1) @ F.normalize(bank.float(), dim=1).T


@torch.no_grad()
def topk_indices(sim: Tensor, k: int, valid: Tensor | None = None) -> Tensor:
    """Indices (N x min(k, D)) of the ``k`` largest similarities; entries outside ``valid`` rank last.

    They are picked only while fewer than k entries are valid: ``valid[indices]`` tells which picks
    count. k does not depend on how full the queue is, so nothing waits for the device.
    """
    if valid is not None:
        sim = sim.masked_fill(~valid.to(sim.device), float("-inf"))
    return sim.topk(min(k, sim.shape[1]), dim=1).indices


@torch.no_grad()
def labels_from_indices(indices: Tensor, size: int, keep: Tensor | None = None) -> Tensor:
    """Binary labels (N x size): 1 at the given indices of each row (those where ``keep`` is true), 0 elsewhere."""
    labels = torch.zeros(len(indices), size, device=indices.device)
    return labels.scatter_(1, indices, 1.0 if keep is None else keep.to(labels.dtype))


@torch.no_grad()
def select_topk(x: Tensor, bank: Tensor, k: int, valid: Tensor | None = None) -> Tensor:
    """Pseudo-labels ``y`` (N x D): 1 for the top-k cosine neighbours of each query in ``bank``.

    ``x`` is ``g1`` (or ``z1``), ``bank`` is ``Q_g`` (or ``Q_z``); entries outside
    ``valid`` are never selected, and fewer than k valid entries are all selected.
    """
    indices = topk_indices(cosine_similarity(x, bank), k, valid)
    return labels_from_indices(indices, bank.shape[0], None if valid is None else valid.to(indices.device)[indices])
