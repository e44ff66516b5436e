"""Frozen features of a backbone, extracted once per data set for the linear probe and k-NN."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm


def device() -> torch.device:
    """The first GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def extract_features(backbone: nn.Module, dataset: Dataset, batch_size: int = 256, workers: int = 0,
                     desc: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features (N x d, CPU float) of a frozen backbone in eval mode, with the stacked targets."""
    backbone.eval().to(device())
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False)
    features, targets = [], []
    for images, target in tqdm(loader, desc=desc, leave=False, disable=None):
        features.append(backbone(images.to(device())).flatten(1).float().cpu())
        targets.append(target)
    return torch.cat(features), torch.cat(targets)
