"""The method's settings, declared once: name, type, default, one-line doc and check.

``MLSConfig`` is what ``mls.MLS`` takes, what ``mls pretrain`` exposes as options, what the YAML
configs fill and what a checkpoint stores. Defaults are the main paper's COCO setting (Zhu, Fu, Wu,
ICCV 2023, §3.3 and §4.1): D = 4,096 for both queues, dz = 256, m = 0.995, k = 20, λ = 0.5, τ = 0.2
shared by InfoNCE and the BCE (Eq. 9, 10).

A setting is one ``setting(default, doc)`` line below plus, if it has a range, one line in
``__post_init__``: nothing else needs editing for the command line, the configs or the checkpoint. For
editors and type checkers, ``mls.train.pretrain_options.PretrainOptions`` spells the settings out as ``pretrain``'s
keywords: rewrite it with ``write_pretrain_options()`` (a test fails until it matches).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from mls.method.extra_losses import EXTRA_LOSSES, extra_loss_help

# The default of a field that has none: every preset (e.g. each data set's protocol) gives its own value.
NO_DEFAULT: Any = dataclasses.MISSING


def setting(default: Any, doc: str, as_type: Any = None, choices: Callable[[], dict[str, str]] | None = None) -> Any:
    """A dataclass field with its one-line ``doc`` (the option's help) and ``default`` (``NO_DEFAULT``: none).

    ``as_type`` is the option's type where it is not the field's: ``list[int]`` for a ``tuple[int, ...]``
    field, since YAML and JSON write lists. ``choices``, a function asked whenever the options are built,
    gives the values allowed and a few words on each: the option's type is then their ``Literal``, and its
    help lists them (a registry that grows after import, as ``mls.method.extra_losses``, shows in both).
    """
    metadata = {"doc": doc}
    if as_type is not None:
        metadata["type"] = as_type
    if choices is not None:
        metadata["choices"] = choices
    return field(default=default, metadata=metadata)


def field_type(f: dataclasses.Field, hints: dict[str, Any]) -> Any:
    """A setting's type as an option: its choices' ``Literal``, its ``as_type``, or its annotation (``hints``)."""
    if "choices" in f.metadata:
        return Literal[tuple(f.metadata["choices"]())]
    return f.metadata.get("type", hints[f.name])


def field_doc(f: dataclasses.Field) -> str:
    """A setting's one-line doc, followed by its choices: "extra loss: bce (Eq. 9), bce_pos (...) or knn (...)"."""
    if "choices" not in f.metadata:
        return f.metadata.get("doc", "")
    listed = [f"{name} ({words})" for name, words in f.metadata["choices"]().items()]
    return f"{f.metadata['doc']}: " + " or ".join([", ".join(listed[:-1]), listed[-1]] if len(listed) > 1 else listed)


def docs(cls) -> dict[str, str]:
    """The one-line doc of every field of a settings dataclass."""
    return {f.name: field_doc(f) for f in dataclasses.fields(cls)}


def check(ok: bool, name: str, message: str) -> None:
    """Refuse a setting in plain words that name it."""
    if not ok:
        raise ValueError(f"{name}: {message}")


def check_probability(name: str, p: float) -> None:
    check(0 <= p <= 1, name, f"is a probability and must be between 0 and 1, got {p}")


def from_dict(cls, values: dict):
    """``cls(**values)`` with the keys that ``cls`` does not have left out. (The names of older checkpoints
    are translated by ``mls.checkpoints.versions``.)"""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


QUEUE_G_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class MLSConfig:
    """MoCo-v2 (``method="mocov2"``) or MLS (``method="mls"``), and every ablation of the main paper."""

    arch: str = setting("resnet50", "torchvision backbone: resnet18, resnet34, resnet50 or resnet101")
    small_stem: bool = setting(False, "3x3 stem without max-pool, for images of 32-96 px")
    method: Literal["mocov2", "mls"] = setting("mls", "mocov2 (InfoNCE only) or mls (InfoNCE + λ x extra loss)")
    mls_loss: str = setting("bce", "extra loss of Table 6", choices=extra_loss_help)  # mls.method.extra_losses
    select_from: Literal["g", "z"] = setting(
        "g", "pseudo-labels from the top-k of g1 in Q_g (g, MLS) or of z1 in Q_z (z; Table 7)")
    logits_from: Literal["z", "g"] = setting(
        "z", "logits p of the extra loss: z1·Q_z (z, MLS) or ĝ1·Q_g with gradient into g1 (g: Table 7, 'Q_g only')")
    topk: int = setting(20, "positive pseudo-labels per query, k (Table 8)")
    queue_size: int = setting(4096, "dictionary size D of both Q_g and Q_z (§4.1, Fig. 5a); below the number of images")
    dim: int = setting(256, "embedding size dz of the projection MLP (§4.1)")
    tau: float = setting(0.2, "temperature τ of InfoNCE, and of the extra loss unless extra_tau is set")
    momentum: float = setting(0.995, "key-encoder momentum m (§4.1: 0.995 'for faster convergence')")
    extra_weight: float = setting(0.5, "λ, the weight of the extra loss (Eq. 10 of the main paper; Fig. 5b)")
    extra_tau: float | None = setting(None, "temperature of the extra loss; null: tau (the paper shares it)")
    bce_balanced: bool = setting(
        False, "BCE: average the positive and the negative terms separately, then sum (not in the paper)")
    logit_bias: Literal["none", "fixed", "learned"] = setting(
        "none", "BCE: score σ(p/τ + b), b starting at log(k/(D-k)), the prior of a positive; fixed or learned "
                "(not in the paper)")
    mask_positives: bool = setting(
        False, "leave each query's pseudo-positives out of InfoNCE's negatives (not in the paper)")
    shuffle_bn: bool = setting(True, "MoCo's shuffle-BN for the key encoder when several ranks run")
    queue_g_dtype: Literal["float32", "bfloat16", "float16"] = setting(
        "float32", "storage type of Q_g (bfloat16/float16 halve its memory)")
    store_g: bool | None = setting(None, "keep Q_g even when no loss needs it (for figures); null: only when needed")

    def __post_init__(self):
        object.__setattr__(self, "mls_loss", self.mls_loss.replace("-", "_"))
        check(self.method in ("mocov2", "mls"), "method", f"must be 'mocov2' or 'mls', got {self.method!r}")
        check(self.mls_loss in EXTRA_LOSSES, "mls_loss", f"must be one of {', '.join(EXTRA_LOSSES)}, got {self.mls_loss!r}")
        check(self.select_from in ("g", "z"), "select_from", f"must be 'g' or 'z', got {self.select_from!r}")
        check(self.logits_from in ("g", "z"), "logits_from", f"must be 'g' or 'z', got {self.logits_from!r}")
        check(self.queue_size >= 1, "queue_size", f"must be positive, got {self.queue_size}")
        check(0 <= self.topk < self.queue_size, "topk", f"k must be in [0, queue_size={self.queue_size}), got {self.topk}")
        check(self.dim >= 1, "dim", f"must be positive, got {self.dim}")
        check(self.tau > 0, "tau", f"the temperature must be > 0, got {self.tau}")
        check(self.extra_tau is None or self.extra_tau > 0, "extra_tau", f"the temperature must be > 0, got {self.extra_tau}")
        check(0 <= self.momentum < 1, "momentum", f"m must be in [0, 1), got {self.momentum}")
        check(self.extra_weight >= 0, "extra_weight", f"λ must be >= 0, got {self.extra_weight}")
        check(self.queue_g_dtype in QUEUE_G_DTYPES, "queue_g_dtype", f"must be one of {', '.join(QUEUE_G_DTYPES)}")
        check(self.logit_bias in ("none", "fixed", "learned"), "logit_bias",
              f"must be none, fixed or learned, got {self.logit_bias!r}")
        sigmoid = [name for name, entry in EXTRA_LOSSES.items() if entry.takes_bias]
        check(self.logit_bias == "none" or self.mls_loss in sigmoid, "logit_bias",
              f"applies to the sigmoid losses ({', '.join(sigmoid)}), not to {self.mls_loss}")
        check(self.logit_bias == "none" or self.topk >= 1, "logit_bias", "needs k >= 1 (the prior of a positive is k/D)")
        if EXTRA_LOSSES[self.mls_loss].check is not None:
            EXTRA_LOSSES[self.mls_loss].check(self)

    @property
    def extra_temperature(self) -> float:
        return self.extra_tau or self.tau

    @property
    def uses_queue_g(self) -> bool:
        """Whether a loss needs ``Q_g``: MLS selecting or scoring with backbone features (or ``store_g``)."""
        needed = self.method == "mls" and "g" in (self.select_from, self.logits_from)
        return needed if self.store_g is None else bool(self.store_g) or needed

    @property
    def prior_logit(self) -> float:
        """``log(k / (D − k))``: the log-odds that a queue entry is one of the k positives."""
        return math.log(self.topk / (self.queue_size - self.topk))
