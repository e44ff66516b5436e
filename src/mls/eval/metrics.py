"""Classification metrics: top-1 accuracy and multi-label mean average precision (mAP).

Multi-label targets are multi-hot with one extra value, ``IGNORE`` (-1), for entries left out of a
class's AP and of the training loss (VOC07's "difficult only" objects). mAP averages per-class AP
over the classes that have at least one positive test image. Two APs are reported:

* ``mAP_voc07`` - the VOC2007 devkit's 11-point interpolated AP (mean over recall 0, 0.1, ..., 1 of
  the best precision at that recall or above); the headline for ``voc07``, as in the VOC07 protocol.
* ``mAP`` - the area under the precision-recall curve (torchmetrics, equal to scikit-learn's
  ``average_precision_score``); the headline for every other multi-label data set.
"""
from __future__ import annotations

import torch
from torchmetrics.functional.classification import multilabel_average_precision

IGNORE = -1


def top1_accuracy(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of samples whose highest score is their class (scores N x C, targets N int)."""
    _check_scores(scores, targets, expect_dims=1)
    return (scores.argmax(dim=1) == targets).float().mean().item()


def ranks_in_unit_interval(scores: torch.Tensor) -> torch.Tensor:
    """Each column's scores replaced by their dense ranks scaled into [0, 1]: the same order and ties.

    torchmetrics passes scores outside [0, 1] through a sigmoid, which in float32 turns every logit
    above ~17 (and every k-NN vote above ~17) into 1.0, tying what was ordered. AP depends on the
    order alone, so ranks keep it exact.
    """
    out = torch.empty_like(scores, dtype=torch.float64)
    for c in range(scores.shape[1]):
        values, rank = torch.unique(scores[:, c], return_inverse=True)
        out[:, c] = rank.double() / max(len(values) - 1, 1)
    return out


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-class area under the precision-recall curve; NaN for classes without positives."""
    _check_scores(scores, targets, expect_dims=2)
    targets = targets.long()
    scores = ranks_in_unit_interval(scores)
    ap = torch.full((scores.shape[1],), float("nan"))
    has_pos = (targets == 1).any(dim=0)
    if has_pos.any():
        keep = has_pos.nonzero().flatten()
        ap[keep] = multilabel_average_precision(
            scores[:, keep], targets[:, keep], num_labels=len(keep), average=None, ignore_index=IGNORE
        ).float()
    return ap


def voc07_average_precision(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-class 11-point interpolated AP of the VOC2007 devkit; NaN for classes without positives."""
    _check_scores(scores, targets, expect_dims=2)
    ap = torch.full((scores.shape[1],), float("nan"))
    for c in range(scores.shape[1]):
        kept = targets[:, c] != IGNORE
        order = scores[kept, c].argsort(descending=True)
        ranked, labels = scores[kept, c][order], targets[kept, c][order] == 1
        if not labels.any():
            continue
        tp = labels.cumsum(0).float()
        last_of_tie = torch.cat([ranked[1:] != ranked[:-1], torch.tensor([True])])  # tied scores: one threshold
        precision = (tp / torch.arange(1, len(labels) + 1))[last_of_tie]
        recall = (tp / labels.sum())[last_of_tie]
        ap[c] = sum(_best_precision(precision, recall, t / 10) for t in range(11)) / 11
    return ap


def _best_precision(precision: torch.Tensor, recall: torch.Tensor, at_recall: float) -> float:
    """Highest precision reached at a recall of at least ``at_recall`` (0 if never reached)."""
    reached = recall >= at_recall - 1e-9
    return precision[reached].max().item() if reached.any() else 0.0


def classification_metrics(scores: torch.Tensor, targets: torch.Tensor, multilabel: bool, voc07: bool = False) -> dict:
    """The metrics of one evaluation, headline first: top1, or mAP (area) and mAP_voc07 in that order or reversed."""
    if not multilabel:
        return {"top1": 100 * top1_accuracy(scores, targets)}
    area = 100 * average_precision(scores, targets).nanmean().item()
    eleven = 100 * voc07_average_precision(scores, targets).nanmean().item()
    return {"mAP_voc07": eleven, "mAP": area} if voc07 else {"mAP": area, "mAP_voc07": eleven}


def _check_scores(scores: torch.Tensor, targets: torch.Tensor, expect_dims: int) -> None:
    """Scores must be N x C and targets N (class indices) or N x C (multi-hot), on the same N."""
    if scores.dim() != 2 or targets.dim() != expect_dims or len(scores) != len(targets):
        want = "N class indices" if expect_dims == 1 else "an N x C multi-hot matrix"
        raise ValueError(
            f"expected scores of shape N x C and targets as {want}, "
            f"got scores {tuple(scores.shape)} and targets {tuple(targets.shape)}"
        )
    if expect_dims == 2 and scores.shape != targets.shape:
        raise ValueError(f"multi-label scores {tuple(scores.shape)} and targets {tuple(targets.shape)} differ in shape")
