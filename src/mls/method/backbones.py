"""Backbones and heads: torchvision ResNets by name, the small-image stem, the projection MLP."""
from __future__ import annotations

import torchvision
from torch import nn

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the input normalisation of torchvision's ResNets, used by every pipeline
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_backbone(arch: str = "resnet50", small_stem: bool = False) -> tuple[nn.Module, int]:
    """A randomly initialised torchvision ResNet without its classifier, and its feature size.

    The forward pass returns the global-average-pooled feature ``g`` (N x dg).
    ``small_stem`` swaps the 7x7/2 convolution and max-pool for one 3x3/1 convolution
    (as for CIFAR), so that images of 32-96 px keep a useful spatial resolution.
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    net = getattr(torchvision.models, arch)(weights=None)
    dim = net.fc.in_features
    net.fc = nn.Identity()
    if small_stem:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        net.maxpool = nn.Identity()
    return net, dim


def projection_head(in_dim: int, out_dim: int = 128, hidden_dim: int | None = None) -> nn.Sequential:
    """MoCo-v2's 2-layer MLP: dg -> dg, ReLU, -> dz (supplement A.2)."""
    hidden_dim = hidden_dim or in_dim
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))

