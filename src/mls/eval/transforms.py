"""Image transforms of the classification protocols: RandomResizedCrop + flip to train, resize + centre crop to test."""
from __future__ import annotations

from torchvision import transforms as T

from mls.method.backbones import IMAGENET_MEAN, IMAGENET_STD


def train_transform(size: int) -> T.Compose:
    """Training augmentation of supervised fine-tuning, ImageNet-normalised."""
    return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def centre_crop(size: int) -> T.Compose:
    """Resize the short side to size / 0.875, then take the central ``size`` x ``size`` crop (224 from 256)."""
    return T.Compose([T.Resize(round(size / 0.875)), T.CenterCrop(size)])


def test_transform(size: int) -> T.Compose:
    """The centre crop of ``centre_crop``, as an ImageNet-normalised tensor."""
    return T.Compose([centre_crop(size), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
