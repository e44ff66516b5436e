"""The MLS model: MoCo-v2 plus a queue ``Q_g`` of backbone features (supplement A.2).

For each query ``x1`` and its key view ``x2``:

1. ``g1 = f_q(x1)``, ``z1 = normalize(MLP_q(g1))`` — only ``z1`` carries gradient (and ``ĝ1``
   when the extra loss scores ``Q_g``, Table 7's "Q_g only").
2. The key encoder (backbone and MLP) moves towards the query encoder,
   ``θk ← m·θk + (1−m)·θq``, then gives ``g2``, ``z2`` without gradient.
3. InfoNCE scores ``z1`` against its key ``z2`` and the keys of ``Q_z`` (MoCo-v2).
4. MLS (``method="mls"``): the top-k entries of ``ĝ1·Q_gᵀ`` are the positive pseudo-labels ``y``,
   and the extra loss (BCE, Eq. 9, or another of ``mls.method.extra_losses``) scores ``p = z1·Q_zᵀ`` against ``y``; the total is
   ``L_InfoNCE + λ·L_extra`` (main paper Eq. 10).
5. ``ĝ2``, ``z2`` and where view 2 came from are pushed into the queues, in the same order.
"""
from __future__ import annotations

import copy
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mls.method import distributed, health
from mls.method.backbones import build_backbone, projection_head
from mls.method.extra_losses import EXTRA_LOSSES
from mls.method.losses import infonce_from_logits
from mls.method.queue import FeatureQueue
from mls.method.selection import labels_from_indices, topk_indices
from mls.method.settings import MLSConfig

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class MLS(nn.Module):
    """MoCo-v2 or MLS with a torchvision backbone; settings in ``MLSConfig`` (``mls.method.settings``).

    ``MLS(config)`` or ``MLS(arch="resnet18", topk=5, ...)`` with ``MLSConfig``'s field names.
    """

    def __init__(self, config: MLSConfig | None = None, **settings):
        super().__init__()
        if config is not None and settings:
            raise TypeError("give MLS either an MLSConfig or keyword settings, not both")
        self.config = cfg = config if config is not None else MLSConfig(**settings)
        self.backbone_q, feature_dim = build_backbone(cfg.arch, cfg.small_stem)
        self.head_q = projection_head(feature_dim, cfg.dim)
        self.backbone_k = copy.deepcopy(self.backbone_q).requires_grad_(False)
        self.head_k = copy.deepcopy(self.head_q).requires_grad_(False)
        self.feature_dim = feature_dim

        fields = {"z": ((cfg.dim,), torch.float32), "index": ((), torch.long), "box": ((4,), torch.float32)}
        if cfg.uses_queue_g:
            fields["g"] = ((feature_dim,), TORCH_DTYPES[cfg.queue_g_dtype])
        self.queue = FeatureQueue(cfg.queue_size, fields)

        # The extra loss of Table 6 (its registry entry), built once with its temperature, options and logit bias.
        self.extra = EXTRA_LOSSES[cfg.mls_loss]
        options = self.extra.options(cfg)
        if cfg.logit_bias != "none":
            # b = log(k/(D−k)), learned (from that start) or fixed; stored either way, so checkpoints carry it
            self.logit_bias = nn.Parameter(torch.tensor(cfg.prior_logit), requires_grad=cfg.logit_bias == "learned")
            options["bias"] = self.logit_bias
        self.extra_loss = partial(self.extra.loss, tau=cfg.extra_temperature, **options)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(query, key) modules updated by momentum: backbone and MLP (supplement A.2)."""
        return [(self.backbone_q, self.backbone_k), (self.head_q, self.head_k)]

    def compile_encoders(self, backend: str = "inductor") -> None:
        """``torch.compile`` both encoders and heads in place: the state dict keeps its keys."""
        for net in (self.backbone_q, self.head_q, self.backbone_k, self.head_k):
            net.compile(backend=backend)

    @torch.no_grad()
    def momentum_update(self) -> None:
        """``θk ← m·θk + (1−m)·θq`` for every momentum pair."""
        for q_net, k_net in self.momentum_pairs():
            k_params, q_params = list(k_net.parameters()), [p.detach() for p in q_net.parameters()]
            torch._foreach_lerp_(k_params, q_params, 1.0 - self.config.momentum)

    def encode_query(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``g1`` (pooled backbone feature) and ``z1`` (normalised projection) of the query view."""
        g = self.backbone_q(x)
        return g, F.normalize(self.head_q(g), dim=1)

    @torch.no_grad()
    def encode_key(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``g2`` and ``z2`` of the key view from the momentum encoder (shuffle-BN across ranks)."""
        shuffle = self.config.shuffle_bn and distributed.world_size() > 1
        if shuffle:
            x, perm = distributed.shuffle_batch(x)
        g = self.backbone_k(x)
        z = self.head_k(g)
        if shuffle:
            g, z = distributed.unshuffle_batch(g, perm), distributed.unshuffle_batch(z, perm)
        return g, F.normalize(z, dim=1)

    def similarity_to_queue_g(self, g: Tensor) -> Tensor:
        """``ĝ·Q_gᵀ`` in fp32: cosine similarity, since rows of ``Q_g`` are normalised when written.

        With ``Q_g`` stored in bf16/fp16 the product reads it as stored (fp32 accumulation)
        rather than making an fp32 copy of the whole queue each step. Differentiable in ``g``:
        then it works on a copy of ``Q_g``, which the push after the loss overwrites.
        """
        bank = self.queue["g"].clone() if g.requires_grad else self.queue["g"]
        # (Q_g·ĝᵀ)ᵀ rather than ĝ·Q_gᵀ: the same numbers, and MKL runs this shape (a tall matrix
        # times a thin one) 1.8x faster on CPU (N = 32, D = 65,536, 2,048-d); cuBLAS runs both alike.
        return (bank @ F.normalize(g.float(), dim=1).to(bank.dtype).T).T.float()

    def forward(self, x1: Tensor, x2: Tensor, meta: dict[str, Tensor] | None = None,
                extra_weight: float | Tensor | None = None, diagnose: bool = False) -> dict[str, Tensor]:
        """One training step's losses and diagnostics; pushes the keys into the queues.

        ``meta`` may hold ``index`` (N,) dataset indices and ``box`` (N, 4) normalised crop boxes
        of view 2, stored beside the keys. ``extra_weight`` is λ for this step (a trainer's warm-up
        or ramp; a tensor is fine); ``None`` takes the configured λ. Returns ``loss`` (to
        minimise), ``loss_infonce``, ``loss_extra`` and the diagnostics of ``selection_stats``; with
        ``diagnose``, also ``health``: the measures of ``mls.method.health`` on the queues as this step saw them.
        """
        cfg = self.config
        g1, z1 = self.encode_query(x1)
        self.momentum_update()
        g2, z2 = self.encode_key(x2)

        with torch.autocast(device_type=x1.device.type, enabled=False):
            q, k = z1.float(), z2.float()
            valid = self.queue.valid
            l_neg = q @ self.queue["z"].clone().T  # p = q·Q_zᵀ; a copy of Q_z, since the push below overwrites it
            # Selection (no gradient): ĝ1·Q_gᵀ (MLS) or z1·Q_zᵀ (Table 7).
            by_g = cfg.select_from == "g" and "g" in self.queue  # MoCo-v2 keeps no Q_g: its diagnostics use Q_z
            sim = self.similarity_to_queue_g(g1.detach()) if by_g else l_neg.detach()
            idx = topk_indices(sim, cfg.topk, valid)
            picked = valid[idx]  # false only for the padding picks while fewer than k entries are written
            labels = labels_from_indices(idx, self.queue.size, picked) if cfg.method == "mls" else None

            negatives = valid
            if cfg.mask_positives and labels is not None:
                negatives = valid & ~labels.bool()  # InfoNCE no longer pushes away what the BCE pulls in
            loss_infonce = infonce_from_logits((q * k).sum(1), l_neg, cfg.tau, negatives)

            loss_extra = l_neg.new_zeros(())
            if labels is not None:
                logits = l_neg if cfg.logits_from == "z" else self.similarity_to_queue_g(g1)
                loss_extra = self.extra_loss(logits, labels, valid=valid)
            weight = cfg.extra_weight if extra_weight is None else extra_weight
            loss = loss_infonce + weight * loss_extra if cfg.method == "mls" else loss_infonce

        out = {"loss": loss, "loss_infonce": loss_infonce.detach(), "loss_extra": loss_extra.detach(),
               **selection_stats(sim, idx, picked, self.queue)}
        if diagnose:
            out["health"] = self.health(q.detach(), k, l_neg.detach(), labels, valid, negatives)
        self._enqueue(g2, k, meta or {})
        return out

    @torch.no_grad()
    def health(self, q: Tensor, k: Tensor, l_neg: Tensor, labels: Tensor | None, valid: Tensor,
               negatives: Tensor) -> dict[str, Tensor]:
        """``mls.method.health``'s measures for one step: the spread of ``Q_z`` (and ``Q_g``), alignment, and the
        gradient on ``z1`` of InfoNCE and of the extra loss's positive and negative terms (λ not applied)."""
        cfg = self.config
        out = health.queue_health(self.queue["z"], valid, self.queue["g"] if "g" in self.queue else None)
        extra = None
        if labels is not None and cfg.logits_from == "z":  # with logits from Q_g the extra loss moves g1, not z1
            options = self.extra.options(cfg)
            if cfg.logit_bias != "none":
                options["bias"] = self.logit_bias.detach()
            extra = self.extra.logit_grads(l_neg, labels, cfg.extra_temperature, valid, **options)
        out.update(health.step_forces(q, k, self.queue["z"], l_neg, cfg.tau, valid, negatives, extra, labels,
                                      cfg.extra_temperature))
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


@torch.no_grad()
def selection_stats(sim: Tensor, idx: Tensor, picked: Tensor, queue: FeatureQueue) -> dict[str, Tensor]:
    """Diagnostics of one step's selection: ``pos_sim`` (mean similarity of the picked neighbours),
    ``queue_fill`` and ``neighbor_index`` (dataset index of each query's neighbours, N x k, -1 where
    unknown). All stay on the device: no host sync."""
    pos_sim = torch.where(picked, sim.gather(1, idx), 0.0).sum() / picked.sum().clamp(min=1)
    return {"pos_sim": pos_sim, "queue_fill": queue.count.float() / queue.size,
            "neighbor_index": torch.where(picked, queue["index"][idx], -1)}
