"""Detection data: COCO instances, and the VOC devkit converted to COCO format in memory.

Both formats end up as one pycocotools ``COCO`` index, so training reads them the same way and
evaluation is COCOeval in both cases (VOC07 included: AP, AP50, AP75 instead of the 11-point VOC AP).
"""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from mls.transfer.metrics import coco_from_dict

DETECTION_FORMATS = ("coco", "voc")


@dataclass
class DetectionSplits:
    """Ground truth of one detection benchmark: train and test indexes, and where their images lie."""

    train: COCO
    test: COCO
    train_images: Path
    test_images: Path

    @property
    def has_masks(self) -> bool:
        """Whether the training annotations carry instance masks (Mask R-CNN) or only boxes (Faster R-CNN)."""
        return any(ann.get("segmentation") for ann in self.train.dataset["annotations"])

    @property
    def category_ids(self) -> list[int]:
        """COCO category ids in label order: label ``l`` (1-based, 0 is background) is ``category_ids[l - 1]``."""
        return sorted(self.train.getCatIds())


def load_detection_splits(data: str | Path, format: str) -> DetectionSplits:
    """Read a COCO root (``annotations/instances_{train,val}2017.json``) or a folder holding ``VOCdevkit/``."""
    if format == "coco":
        return _coco_splits(Path(data))
    if format == "voc":
        return _voc_splits(Path(data))
    raise ValueError(f"format must be one of {', '.join(DETECTION_FORMATS)}, got {format!r}")


def _coco_splits(root: Path) -> DetectionSplits:
    indexes = {}
    for split in ("train2017", "val2017"):
        path = root / "annotations" / f"instances_{split}.json"
        if not path.is_file():
            raise FileNotFoundError(f"COCO data: expected {path} (root/annotations/instances_{split}.json)")
        indexes[split] = coco_from_dict(json.loads(path.read_text()))
    return DetectionSplits(indexes["train2017"], indexes["val2017"], root / "train2017", root / "val2017")


# ---------------------------------------------------------------------------------------------
# PASCAL VOC


def voc_sets(devkit: Path, names: tuple[str, ...], years: tuple[str, ...] = ("2007", "2012"),
             kind: str = "Main") -> list[tuple[str, str]]:
    """(year, image set) pairs whose ``ImageSets/<kind>/<set>.txt`` exists in the devkit."""
    return [(year, name) for year in years for name in names
            if (devkit / f"VOC{year}" / "ImageSets" / kind / f"{name}.txt").is_file()]


def read_voc_xml(path: str | Path, file_name: str) -> dict:
    """One VOC annotation file (parsed by torchvision's reader): image size and objects."""
    parsed = torchvision.datasets.VOCDetection.parse_voc_xml(ET.parse(path).getroot())["annotation"]
    return {"file_name": file_name, "size": parsed["size"], "objects": parsed["object"]}


def _voc_records(root: Path, sets: list[tuple[str, str]]) -> list[dict]:
    """Annotations of the given (year, image set) pairs, image paths relative to ``VOCdevkit``."""
    records = []
    for year, image_set in sets:
        voc = torchvision.datasets.VOCDetection(str(root), year=year, image_set=image_set)
        records += [read_voc_xml(annotation, str(Path(image).relative_to(root / "VOCdevkit")))
                    for image, annotation in zip(voc.images, voc.annotations)]
    return records


def voc_class_names(devkit: Path, records: Sequence[dict] = ()) -> list[str]:
    """VOC's classes, sorted (PASCAL VOC's usual order): those with a list ``ImageSets/Main/<class>_trainval.txt``,
    so that a class missing from the images still counts, and any other object name in ``records``."""
    listed = {path.name[: -len("_trainval.txt")] for path in devkit.glob("VOC*/ImageSets/Main/*_trainval.txt")}
    return sorted(listed | {obj["name"] for record in records for obj in record["objects"]})


def voc_to_coco(records: list[dict], class_names: list[str], difficult_as_crowd: bool) -> dict:
    """COCO-format dict of VOC records; boxes go from 1-based inclusive to 0-based (x, y, w, h) as detectron2.

    ``difficult_as_crowd`` marks difficult objects ``iscrowd=1``, so COCOeval ignores them as the
    VOC evaluation does; for training they are kept as ordinary objects (as detectron2 does).
    """
    category = {name: k + 1 for k, name in enumerate(class_names)}
    images, annotations = [], []
    for image_id, record in enumerate(records, start=1):
        images.append({"id": image_id, "file_name": record["file_name"],
                       "width": int(record["size"]["width"]), "height": int(record["size"]["height"])})
        for obj in record["objects"]:
            box = obj["bndbox"]
            x0, y0 = float(box["xmin"]) - 1.0, float(box["ymin"]) - 1.0
            w, h = float(box["xmax"]) - x0, float(box["ymax"]) - y0
            difficult = int(obj.get("difficult", 0)) == 1
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": category[obj["name"]], "bbox": [x0, y0, w, h], "area": w * h,
                                "iscrowd": int(difficult and difficult_as_crowd)})
    categories = [{"id": k, "name": name} for name, k in category.items()]
    return {"images": images, "annotations": annotations, "categories": categories}


def _voc_splits(root: Path) -> DetectionSplits:
    """MoCo's VOC protocol: VOC2007 (+ VOC2012 when present) trainval for training, VOC2007 test for testing."""
    devkit = root / "VOCdevkit"
    train_sets = voc_sets(devkit, ("trainval",))
    test_sets = voc_sets(devkit, ("test",), years=("2007",))
    if not train_sets or not test_sets:
        raise FileNotFoundError(
            f"VOC data: expected {devkit}/VOC2007/ImageSets/Main/trainval.txt and test.txt "
            f"(and optionally VOC2012/ImageSets/Main/trainval.txt); found trainval in {train_sets or 'none'}, "
            f"test in {test_sets or 'none'}")
    train, test = _voc_records(root, train_sets), _voc_records(root, test_sets)
    names = voc_class_names(devkit, train + test)
    return DetectionSplits(coco_from_dict(voc_to_coco(train, names, difficult_as_crowd=False)),
                           coco_from_dict(voc_to_coco(test, names, difficult_as_crowd=True)), devkit, devkit)


# ---------------------------------------------------------------------------------------------
# Data set


class CocoInstances(Dataset):
    """Images of a COCO index with torchvision detection targets (boxes xyxy, labels, masks).

    Training drops crowd objects and images left without objects, as detectron2 does, and flips
    horizontally at random; rescaling is the detector's own (``GeneralizedRCNNTransform``).
    """

    def __init__(self, coco: COCO, image_dir: str | Path, train: bool, masks: bool, category_ids: list[int]):
        self.coco, self.image_dir, self.train, self.masks = coco, Path(image_dir), train, masks
        self.label = {cat: k + 1 for k, cat in enumerate(category_ids)}
        ids = sorted(coco.getImgIds())
        if train:
            ids = [i for i in ids if self._objects(i)]
        if not ids:
            raise ValueError(f"no {'training' if train else 'test'} image with objects under {self.image_dir}")
        self.ids = ids
        self.transform = v2.RandomHorizontalFlip(0.5) if train else v2.Identity()

    def _objects(self, image_id: int) -> list[dict]:
        anns = self.coco.imgToAnns[image_id]
        if self.train:
            anns = [a for a in anns if not a.get("iscrowd", 0) and a["bbox"][2] >= 1 and a["bbox"][3] >= 1]
        return anns

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        path = self.image_dir / info["file_name"]
        try:
            image = tv_tensors.Image(torchvision.transforms.functional.pil_to_tensor(Image.open(path).convert("RGB")))
        except OSError as error:
            raise OSError(f"cannot read image {path} (image id {image_id}): {error}") from error
        anns = self._objects(image_id)
        h, w = image.shape[-2:]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        target = {"boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w)),
                  "labels": torch.tensor([self.label[a["category_id"]] for a in anns], dtype=torch.int64)}
        if self.masks:
            stacked = np.stack([self.coco.annToMask(a) for a in anns]) if anns else np.zeros((0, h, w), np.uint8)
            target["masks"] = tv_tensors.Mask(torch.from_numpy(stacked))
        image, target = self.transform(image, target)
        target = {key: value.as_subclass(torch.Tensor) for key, value in target.items()}
        target["image_id"] = image_id
        return image.as_subclass(torch.Tensor).float() / 255.0, target


def collate_lists(batch: list) -> tuple:
    """Detection batches stay lists of images and targets (the detector resizes and pads them itself)."""
    return tuple(zip(*batch))
