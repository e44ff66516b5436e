"""Semantic segmentation data: Cityscapes (19 train ids) and PASCAL VOC ``SegmentationClass``, 255 ignored.

Both are read by torchvision's own data sets; training augmentation is mmsegmentation's: random
rescale (ratio 0.5-2 of a base scale), random crop padded with the ignore label, horizontal flip.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torchvision
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from mls.method.backbones import IMAGENET_MEAN, IMAGENET_STD
from mls.transfer.detection_data import read_voc_xml, voc_class_names, voc_sets

SEGMENTATION_DATASETS = ("cityscapes", "voc-seg")
IGNORE_PIXEL = 255


def cityscapes_train_ids() -> torch.Tensor:
    """Look-up table from Cityscapes ``labelIds`` (0-255) to the 19 train ids, everything else 255."""
    lut = torch.full((256,), IGNORE_PIXEL, dtype=torch.uint8)
    for c in torchvision.datasets.Cityscapes.classes:
        if c.id >= 0 and 0 <= c.train_id < IGNORE_PIXEL:
            lut[c.id] = c.train_id
    return lut


def segmentation_train_transform(scale: Sequence[int], crop_size: int, ratio_range: Sequence[float]) -> v2.Transform:
    """mmseg's training pipeline: fit into ``scale`` (h, w) times a random ratio, crop (pad 255), flip."""
    return v2.Compose([
        v2.ScaleJitter(target_size=tuple(scale), scale_range=tuple(ratio_range), antialias=True),
        v2.RandomCrop(crop_size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_PIXEL}),
        v2.RandomHorizontalFlip(0.5),
    ])


class SegmentationPairs(Dataset):
    """Normalised image and long label map of a torchvision (image, label PNG) data set.

    ``lut`` maps the stored label values to training labels (Cityscapes ids -> train ids).
    Test images keep their size: rescaling for inference happens in the model's evaluation.
    """

    def __init__(self, base: Dataset, num_classes: int, transform: v2.Transform | None = None,
                 lut: torch.Tensor | None = None):
        self.base, self.num_classes, self.transform, self.lut = base, num_classes, transform, lut
        self.normalise = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.base[index]
        image = tv_tensors.Image(v2.functional.pil_to_tensor(image.convert("RGB")))
        label = v2.functional.pil_to_tensor(label)[0]
        if self.lut is not None:
            label = self.lut[label.long()]
        wrong = (label != IGNORE_PIXEL) & (label >= self.num_classes)
        if wrong.any():
            raise ValueError(f"label map {index} of {type(self.base).__name__} holds value {int(label[wrong][0])}; "
                             f"expected 0..{self.num_classes - 1} or {IGNORE_PIXEL} (ignore)")
        label = tv_tensors.Mask(label)
        if self.transform is not None:
            image, label = self.transform(image, label)
        return self.normalise(image).as_subclass(torch.Tensor), label.as_subclass(torch.Tensor).long()


def segmentation_splits(data: str | Path, dataset: str) -> tuple[Dataset, Dataset, int, torch.Tensor | None]:
    """Train and test sets of torchvision's reader, the number of classes and the label look-up table.

    ``cityscapes``: ``leftImg8bit/`` + ``gtFine/`` of train and val. ``voc-seg``: VOC2012 (else VOC2007)
    ``ImageSets/Segmentation`` train -> val when both lists exist, else trainval -> test; its classes are
    background plus VOC's classes (``voc_class_names``: 21 for PASCAL VOC).
    """
    root = Path(data)
    if dataset == "cityscapes":
        for folder in ("leftImg8bit", "gtFine"):
            if not (root / folder / "train").is_dir() or not (root / folder / "val").is_dir():
                raise FileNotFoundError(f"Cityscapes data: expected {root / folder}/train and /val")
        train, test = (torchvision.datasets.Cityscapes(str(root), split=s, mode="fine", target_type="semantic")
                       for s in ("train", "val"))
        return train, test, 19, cityscapes_train_ids()
    if dataset == "voc-seg":
        devkit = root / "VOCdevkit"
        for year in ("2012", "2007"):
            names = {s for _, s in voc_sets(devkit, ("train", "val", "trainval", "test"), (year,), "Segmentation")}
            pair = ("train", "val") if {"train", "val"} <= names else ("trainval", "test")
            if set(pair) <= names:
                break
        else:
            raise FileNotFoundError(f"VOC segmentation data: expected {devkit}/VOC2012 (or VOC2007)/ImageSets/"
                                    "Segmentation/train.txt and val.txt (or trainval.txt and test.txt)")
        train, test = (torchvision.datasets.VOCSegmentation(str(root), year=year, image_set=s) for s in pair)
        names = voc_class_names(devkit) or voc_class_names(devkit, [
            read_voc_xml(Path(path).parents[1] / "Annotations" / f"{Path(path).stem}.xml", path)
            for path in train.images + test.images])
        return train, test, 1 + len(names), None
    raise ValueError(f"dataset must be one of {', '.join(SEGMENTATION_DATASETS)}, got {dataset!r}")
