"""Frozen-feature protocols: a linear probe and weighted k-NN, on features extracted once per task.

Each protocol takes a ``Task`` and a run seed and returns ``(test scores N x C, test targets)``.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mls.checkpoints.pretrained import load_backbone
from mls.eval.datasets import EvalData, Transformed
from mls.eval.features import extract_features
from mls.eval.metrics import IGNORE
from mls.eval.transforms import test_transform


@dataclass
class Task:
    """What every protocol needs: the weights to evaluate, the data, the resolution and the loader settings."""

    weights: str
    arch: str
    small_stem: bool
    data: EvalData
    image_size: int
    batch_size: int
    workers: int

    def backbone(self) -> tuple[nn.Module, int]:
        """A fresh copy of the backbone under evaluation and its feature size."""
        net, dim, _ = load_backbone(self.weights, arch=self.arch, small_stem=self.small_stem)
        return net, dim

    @functools.cached_property
    def features(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Frozen train and test features with their targets, from centre crops, computed once."""
        net, _ = self.backbone()
        transform = test_transform(self.image_size)
        train = extract_features(net, Transformed(self.data.train, transform), self.batch_size, self.workers, "train")
        test = extract_features(net, Transformed(self.data.test, transform), self.batch_size, self.workers, "test")
        return (*train, *test)


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """Cross-entropy for single-label targets; BCE over the non-ignored entries for multi-hot ones."""
    if not multilabel:
        return F.cross_entropy(logits, targets)
    keep = targets != IGNORE
    return F.binary_cross_entropy_with_logits(logits[keep], targets[keep].float())


def linear_probe(task: Task, seed: int, epochs: int = 100, lr: float = 0.1, weight_decay: float = 0.0) -> tuple:
    """Train a linear layer on standardised frozen features (SGD, momentum 0.9, cosine lr); score the test set."""
    train_x, train_y, test_x, test_y = task.features
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6  # as MAE's BatchNorm without affine before the head
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = nn.Linear(train_x.shape[1], len(task.data.classes))
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train_x) / task.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    for _ in range(epochs):
        for batch in torch.randperm(len(train_x), generator=generator).split(task.batch_size):
            loss = classification_loss(head(train_x[batch]), train_y[batch], task.data.multilabel)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    with torch.no_grad():
        return head(test_x), test_y


def knn_classify(task: Task, seed: int, k: int = 20, temperature: float = 0.07) -> tuple:
    """Weighted k-NN on L2-normalised features (InstDisc): each of the k nearest training images votes
    exp(cosine / temperature) for its class, or for each of its positive labels in multi-label tasks."""
    del seed  # k-NN is deterministic given the features
    train_x, train_y, test_x, test_y = task.features
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    votes = knn_scores(train_x, train_y, test_x, len(task.data.classes), task.data.multilabel, k, temperature)
    return votes, test_y


def knn_scores(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, num_classes: int,
               multilabel: bool, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Class scores (N_test x C): the sum over the k most similar training features of exp(cos / temperature)
    times the neighbour's one-hot (or multi-hot, ignored entries as 0) label."""
    labels = train_y.clamp(min=0).float() if multilabel else F.one_hot(train_y, num_classes).float()
    train_n = F.normalize(train_x, dim=1)
    scores = []
    for queries in F.normalize(test_x, dim=1).split(chunk):
        sim, idx = (queries @ train_n.T).topk(min(k, len(train_n)), dim=1)
        scores.append(torch.einsum("nk,nkc->nc", (sim / temperature).exp(), labels[idx]))
    return torch.cat(scores)
