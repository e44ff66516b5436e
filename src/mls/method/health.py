"""Representation health: label-free measures of how spread the embeddings are, and the forces on them.

Each is a pure function of tensors the training step already holds (the queues, ``z1``, ``z2``,
the logits ``p = z1·Q_zᵀ`` and the pseudo-labels ``y``), computed on the device:

- ``mean_norm``: ‖mean(Q_z)‖, near 1 when every key points the same way, near 0 when they spread;
- ``uniformity`` (Wang & Isola, ICML 2020): ``log E exp(−2‖zᵢ − zⱼ‖²)`` over pairs of queue rows,
  0 when collapsed, lower when spread (about −4 for random directions in many dimensions);
- ``alignment`` (same paper): ``E‖z1 − z2‖²`` between the two views of an image;
- ``effective_rank`` (RankMe, Garrido et al., ICML 2023): ``exp(H(σ/‖σ‖₁))`` of the singular values
  ``σ`` of a set of embeddings, from 1 (one direction) to their dimension;
- ``spread``: lightly's collapse check, the std over rows of L2-normalised embeddings, times √d so
  that 0 is collapsed and 1 is spread evenly over the sphere;
- ``step_forces``: the gradient on ``z1`` of InfoNCE and of the extra loss, the latter from its gradient on
  its logits ``p`` in closed form (each extra loss's ``logit_grads`` in ``mls.method.extra_losses``, e.g. for
  Eq. 9 ``∂L/∂pᵢ = (σ(pᵢ/τ) − yᵢ) / (τ·D)``) times ``Q_z``, split into the part from the positive terms and
  the part from the negative terms (no second backward pass).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# Rows of a queue used for the pairwise and spectral measures: enough for a stable estimate, few
# enough that the measures cost a small share of a step at D = 65,536.
SAMPLE_ROWS = 512
PAIR_ROWS = 256


def sample_rows(bank: Tensor, valid: Tensor, rows: int) -> tuple[Tensor, Tensor]:
    """At most ``rows`` evenly strided rows of ``bank`` (fp32) and their ``valid`` flags: no random draw,
    so that logging never changes a run's random stream."""
    step = max(1, len(bank) // rows)
    return bank[::step][:rows].float(), valid[::step][:rows]


def mean_norm(bank: Tensor, valid: Tensor) -> Tensor:
    """‖mean of the valid rows‖ (rows are unit vectors): 1 when all are equal, ~1/√n when spread."""
    w = valid.to(bank.dtype)[:, None]
    return ((bank.float() * w).sum(0) / w.sum().clamp(min=1)).norm()


def uniformity(bank: Tensor, valid: Tensor, t: float = 2.0) -> Tensor:
    """``log E exp(−t‖zᵢ − zⱼ‖²)`` over the pairs i ≠ j of valid rows of unit vectors."""
    sq = (2.0 - 2.0 * bank @ bank.T).clamp(min=0)
    pair = valid[:, None] & valid[None, :] & ~torch.eye(len(bank), dtype=torch.bool, device=bank.device)
    terms = (-t * sq).masked_fill(~pair, float("-inf"))
    return torch.logsumexp(terms.flatten(), 0) - torch.log(pair.sum().clamp(min=1).float())


def alignment(z1: Tensor, z2: Tensor) -> Tensor:
    """``E‖z1 − z2‖²`` over the batch: 0 when both views embed alike, 4 at the opposite."""
    return (z1.float() - z2.float()).pow(2).sum(1).mean()


def effective_rank(x: Tensor, eps: float = 1e-7) -> Tensor:
    """RankMe: ``exp(−Σ pₖ log pₖ)`` with ``pₖ = σₖ/‖σ‖₁ + ε``, ``σ`` the singular values of ``x`` (n x d).

    From the eigenvalues of the smaller Gram matrix (``xᵀx`` or ``xxᵀ``), which is cheaper than an SVD
    of a tall matrix and gives the same non-zero singular values; in fp64, since the square root of an
    fp32 eigenvalue near 0 is off by ~1e-3 of the largest singular value. Zero rows change nothing.
    """
    x = x.double()
    gram = x.T @ x if x.shape[0] >= x.shape[1] else x @ x.T
    sigma = torch.linalg.eigvalsh(gram).clamp(min=0).sqrt()
    p = sigma / sigma.sum().clamp(min=1e-12) + eps
    return torch.exp(-(p * p.log()).sum()).float()


def spread(bank: Tensor, valid: Tensor) -> Tensor:
    """√d x the mean over dimensions of the std over valid rows of L2-normalised rows (lightly's
    ``std_of_l2_normalized``): 0 when every row is the same, about 1 when spread over the sphere."""
    x, w = F.normalize(bank.float(), dim=1), valid.to(torch.float32)[:, None]
    n = w.sum().clamp(min=2)
    mean = (x * w).sum(0) / n
    var = (((x - mean) ** 2) * w).sum(0) / (n - 1)
    return var.sqrt().mean() * math.sqrt(x.shape[1])


def infonce_logit_grads(l_pos: Tensor, l_neg: Tensor, tau: float, valid: Tensor) -> tuple[Tensor, Tensor]:
    """``∂ℓ/∂(q·k⁺)`` (N,) and ``∂ℓ/∂p`` (N x D) of one query's InfoNCE: ``(softmax − one-hot)/τ``."""
    mask = valid.reshape(-1, l_neg.shape[-1]).expand_as(l_neg)
    x = torch.cat([l_pos.float()[:, None], l_neg.float().masked_fill(~mask, float("-inf"))], 1) / tau
    s = torch.softmax(x, dim=1)
    return (s[:, 0] - 1.0) / tau, s[:, 1:] / tau


def tangent_norm(grad: Tensor, q: Tensor) -> Tensor:
    """Mean over queries of the norm of ``grad`` (N x d) along the unit sphere at ``q``: the part that
    moves the embedding (its radial part is removed by the normalisation of ``z1``)."""
    q = q.float()
    return (grad - (grad * q).sum(1, keepdim=True) * q).norm(dim=1).mean()


@torch.no_grad()
def queue_health(queue_z: Tensor, valid: Tensor, queue_g: Tensor | None = None) -> dict[str, Tensor]:
    """The spread of ``Q_z`` (and of ``Q_g`` where it is kept), on strided samples of their rows."""
    z, ok = sample_rows(queue_z, valid, SAMPLE_ROWS)
    pairs, pair_ok = sample_rows(queue_z, valid, PAIR_ROWS)
    out = {"mean_norm": mean_norm(z, ok), "uniformity": uniformity(pairs, pair_ok),
           "rank_z": effective_rank(z * ok[:, None]), "spread_z": spread(z, ok)}
    if queue_g is not None:
        g, ok_g = sample_rows(queue_g, valid, SAMPLE_ROWS)
        out["rank_g"] = effective_rank(g * ok_g[:, None])
    return out


@torch.no_grad()
def step_forces(q: Tensor, k: Tensor, queue_z: Tensor, l_neg: Tensor, tau: float, valid: Tensor,
                negatives: Tensor | None = None, extra: tuple[Tensor, Tensor] | None = None,
                labels: Tensor | None = None, extra_tau: float | None = None) -> dict[str, Tensor]:
    """Alignment, and the norm of each loss's gradient on ``z1`` along the sphere (per query, λ not applied).

    ``l_neg`` is ``p = z1·Q_zᵀ``; ``valid`` the written rows of the queue, ``negatives`` InfoNCE's negatives
    (default: ``valid``; one mask per query when the pseudo-positives are left out); ``extra`` is
    the extra loss's ``logit_grads`` (positive, negative) pair; ``labels`` the pseudo-labels, for the mean logit ``p/τ``
    (τ of the extra loss) of the positives (NaN when there are none) and of the negatives.
    """
    bank = queue_z.float()
    d_pos, d_neg = infonce_logit_grads((q * k).sum(1), l_neg, tau, valid if negatives is None else negatives)
    out = {"alignment": alignment(q, k),
           "grad_infonce": tangent_norm(d_pos[:, None] * k.float() + d_neg @ bank, q)}
    if extra is not None:
        out["grad_extra_pos"] = tangent_norm(extra[0] @ bank, q)
        out["grad_extra_neg"] = tangent_norm(extra[1] @ bank, q)
    if labels is not None:
        y = labels.float()
        neg = valid.reshape(1, -1).float() - y
        t = extra_tau or tau
        out["logit_pos"] = (l_neg * y).sum() / y.sum() / t  # NaN without positives (k = 0)
        out["logit_neg"] = (l_neg * neg).sum() / neg.sum().clamp(min=1) / t
    return out
