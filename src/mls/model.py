"""The MLS model: MoCo-v2 plus a queue ``Q_g`` of backbone features (supplement A.2).

For each query ``x1`` and its key view ``x2``:

1. ``g1 = f_q(x1)``, ``z1 = normalize(MLP_q(g1))`` — only ``z1`` carries gradient.
2. The key encoder (backbone and MLP) moves towards the query encoder,
   ``θk ← m·θk + (1−m)·θq``, then gives ``g2``, ``z2`` without gradient.
3. ``p = z1·Q_zᵀ``; InfoNCE scores ``z2`` against ``Q_z``.
4. MLS (``method="mls"``): the top-k entries of ``ĝ1·Q_gᵀ`` are the positive pseudo-labels
   ``y`` and the extra loss (BCE, Eq. 9, by default) scores ``p`` against ``y``.
5. ``ĝ2``, ``z2`` and where view 2 came from are pushed into the queues, in the same order.
"""
from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mls import distributed
from mls.backbones import build_backbone, projection_head
from mls.losses import EXTRA_LOSSES, infonce_from_logits
from mls.queue import FeatureQueue
from mls.selection import labels_from_indices, topk_indices

QUEUE_G_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _check(ok: bool, setting: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{setting}: {message}")


class MLS(nn.Module):
    """MoCo-v2 (``method="mocov2"``) or MLS (``method="mls"``) with a torchvision backbone.

    Args:
        arch: torchvision ResNet name (resnet18/34/50/101).
        method: ``mocov2`` (InfoNCE only) or ``mls`` (InfoNCE + ``bce_weight`` x extra loss).
        mls_loss: the extra loss of Table 6: ``bce`` (Eq. 9, MLS), ``bce_pos`` (Eq. 15), ``knn`` (Eq. 10).
        select_from: ``g`` selects pseudo-labels with ``g1`` in ``Q_g`` (MLS); ``z`` with ``z1`` in ``Q_z`` (Table 7).
        topk: number of positive pseudo-labels per query, k (Table 8).
        queue_size: dictionary size D.
        dim: embedding size dz.
        tau: temperature of InfoNCE.
        momentum: key-encoder momentum m.
        bce_weight: λ, the weight of the extra loss.
        bce_tau: temperature of the extra loss; ``None`` uses ``tau``.
        bce_balanced: average positive and negative BCE terms separately, then sum.
        extra_after_full_queue: switch the extra loss on only once the queue is full.
        small_stem: 3x3 stem without max-pool, for images of 32-96 px.
        shuffle_bn: MoCo's shuffle-BN for the key encoder when several ranks run.
        queue_g_dtype: storage type of ``Q_g`` (``bfloat16``/``float16`` halve its memory).
        store_g: keep ``Q_g`` even when selection does not need it (for figures); ``None``: only when it does.
    """

    def __init__(
        self,
        arch: str = "resnet50",
        method: Literal["mocov2", "mls"] = "mls",
        mls_loss: Literal["bce", "bce_pos", "knn"] = "bce",
        select_from: Literal["g", "z"] = "g",
        topk: int = 20,
        queue_size: int = 65536,
        dim: int = 128,
        tau: float = 0.2,
        momentum: float = 0.999,
        bce_weight: float = 1.0,
        bce_tau: float | None = None,
        bce_balanced: bool = False,
        extra_after_full_queue: bool = False,
        small_stem: bool = False,
        shuffle_bn: bool = True,
        queue_g_dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        store_g: bool | None = None,
    ):
        super().__init__()
        mls_loss = mls_loss.replace("-", "_")
        _check(method in ("mocov2", "mls"), "method", f"must be 'mocov2' or 'mls', got {method!r}")
        _check(mls_loss in EXTRA_LOSSES, "mls_loss", f"must be one of {sorted(EXTRA_LOSSES)}, got {mls_loss!r}")
        _check(select_from in ("g", "z"), "select_from", f"must be 'g' or 'z', got {select_from!r}")
        _check(queue_size >= 1, "queue_size", f"must be positive, got {queue_size}")
        _check(0 <= topk < queue_size, "topk", f"k must be in [0, queue_size={queue_size}), got {topk}")
        _check(dim >= 1, "dim", f"must be positive, got {dim}")
        _check(tau > 0, "tau", f"the temperature must be > 0, got {tau}")
        _check(bce_tau is None or bce_tau > 0, "bce_tau", f"the temperature must be > 0, got {bce_tau}")
        _check(0 <= momentum < 1, "momentum", f"m must be in [0, 1), got {momentum}")
        _check(bce_weight >= 0, "bce_weight", f"λ must be >= 0, got {bce_weight}")
        _check(queue_g_dtype in QUEUE_G_DTYPES, "queue_g_dtype", f"must be one of {sorted(QUEUE_G_DTYPES)}")
        self.method, self.mls_loss, self.select_from = method, mls_loss, select_from
        self.topk, self.tau, self.momentum = topk, tau, momentum
        self.bce_weight, self.bce_tau, self.bce_balanced = bce_weight, bce_tau or tau, bce_balanced
        self.extra_after_full_queue, self.shuffle_bn = extra_after_full_queue, shuffle_bn
        self.extra_enabled = True  # a trainer may hold the extra loss back for the first epochs

        self.backbone_q, feature_dim = build_backbone(arch, small_stem)
        self.head_q = projection_head(feature_dim, dim)
        self.backbone_k = copy.deepcopy(self.backbone_q).requires_grad_(False)
        self.head_k = copy.deepcopy(self.head_q).requires_grad_(False)
        self.feature_dim = feature_dim

        fields = {"z": ((dim,), torch.float32), "index": ((), torch.long), "box": ((4,), torch.float32)}
        if store_g or (store_g is None and method == "mls" and select_from == "g"):
            fields["g"] = ((feature_dim,), QUEUE_G_DTYPES[queue_g_dtype])
        self.queue = FeatureQueue(queue_size, fields)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(query, key) modules updated by momentum: backbone and MLP (supplement A.2)."""
        return [(self.backbone_q, self.backbone_k), (self.head_q, self.head_k)]

    @torch.no_grad()
    def momentum_update(self) -> None:
        """``θk ← m·θk + (1−m)·θq`` for every momentum pair."""
        for q_net, k_net in self.momentum_pairs():
            k_params, q_params = list(k_net.parameters()), [p.detach() for p in q_net.parameters()]
            torch._foreach_lerp_(k_params, q_params, 1.0 - self.momentum)

    def encode_query(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``g1`` (pooled backbone feature) and ``z1`` (normalised projection) of the query view."""
        g = self.backbone_q(x)
        return g, F.normalize(self.head_q(g), dim=1)

    @torch.no_grad()
    def encode_key(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``g2`` and ``z2`` of the key view from the momentum encoder (shuffle-BN across ranks)."""
        shuffle = self.shuffle_bn and distributed.world_size() > 1
        if shuffle:
            x, perm = distributed.shuffle_batch(x)
        g = self.backbone_k(x)
        z = self.head_k(g)
        if shuffle:
            g, z = distributed.unshuffle_batch(g, perm), distributed.unshuffle_batch(z, perm)
        return g, F.normalize(z, dim=1)

    @torch.no_grad()
    def similarity_to_queue_g(self, g: Tensor) -> Tensor:
        """``ĝ·Q_gᵀ`` in fp32: cosine similarity, since rows of ``Q_g`` are normalised when written.

        With ``Q_g`` stored in bf16/fp16 the product reads it as stored (fp32 accumulation)
        rather than making an fp32 copy of the whole queue each step.
        """
        bank = self.queue["g"]
        return (F.normalize(g.float(), dim=1).to(bank.dtype) @ bank.T).float()

    def forward(self, x1: Tensor, x2: Tensor, meta: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """One training step's losses and diagnostics; pushes the keys into the queues.

        ``meta`` may hold ``index`` (N,) dataset indices and ``box`` (N, 4) normalised crop
        boxes of view 2, stored beside the keys. Returns ``loss`` (to minimise),
        ``loss_infonce``, ``loss_extra``, ``pos_sim`` (mean similarity of the selected
        neighbours), ``queue_fill`` and ``neighbor_index`` (dataset indices of each query's
        selected neighbours, N x k, -1 where unknown).
        """
        g1, z1 = self.encode_query(x1)
        self.momentum_update()
        g2, z2 = self.encode_key(x2)

        with torch.autocast(device_type=x1.device.type, enabled=False):
            q, k, g1 = z1.float(), z2.float(), g1.detach().float()
            valid = self.queue.valid
            # p = q·Q_zᵀ, shared by every loss; a copy of Q_z, since the push below overwrites it
            l_neg = q @ self.queue["z"].clone().T
            loss_infonce = infonce_from_logits((q * k).sum(1), l_neg, self.tau, valid)

            if self.select_from == "g" and "g" in self.queue:
                sim = self.similarity_to_queue_g(g1)
            else:  # Table 7: select with z1 in Q_z; both are normalised, so p is the cosine
                sim = l_neg.detach()
            idx = topk_indices(sim, self.topk, valid)
            picked = valid[idx]  # false only for the padding picks while fewer than k entries are written
            pos_sim = torch.where(picked, sim.gather(1, idx), 0.0).sum() / picked.sum().clamp(min=1)

            loss_extra = l_neg.new_zeros(())
            if self.method == "mls":
                labels = labels_from_indices(idx, self.queue.size, picked)
                loss_fn = EXTRA_LOSSES[self.mls_loss]
                kwargs = {"balanced": self.bce_balanced} if self.mls_loss == "bce" else {}
                loss_extra = loss_fn(l_neg, labels, self.bce_tau, valid, **kwargs)
            waiting = self.extra_after_full_queue and not bool(valid.all())
            extra_on = self.method == "mls" and self.extra_enabled and not waiting
            loss = loss_infonce + self.bce_weight * loss_extra if extra_on else loss_infonce

        out = {
            "loss": loss,
            "loss_infonce": loss_infonce.detach(),
            "loss_extra": loss_extra.detach(),
            "pos_sim": pos_sim,
            "queue_fill": self.queue.count.float() / self.queue.size,
            "neighbor_index": torch.where(picked, self.queue["index"][idx], -1),
        }
        self._enqueue(g2, k, meta or {})
        return out

    @torch.no_grad()
    def _enqueue(self, g2: Tensor, z2: Tensor, meta: dict[str, Tensor]) -> None:
        n = len(z2)
        entry = {
            "z": z2,
            "index": meta.get("index", torch.full((n,), -1, dtype=torch.long, device=z2.device)),
            "box": meta.get("box", torch.zeros(n, 4, device=z2.device)),
        }
        if "g" in self.queue:
            entry["g"] = F.normalize(g2.float(), dim=1)
        self.queue.push(**entry)
