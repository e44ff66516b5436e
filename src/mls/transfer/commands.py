"""``mls transfer {detect,segment}``: fine-tune a pretrained backbone on dense tasks, repeat, and report.

Each protocol's paper schedule is the default (``DETECTION``, ``SEGMENTATION``); every option overrides
it, and ``--config configs/transfer_*.yaml`` sets several at once. Every option is declared once, as a
documented dataclass field: the model's and the protocol's in ``mls.transfer.settings``, those both
commands share (weights, hardware, output, seed) in ``RunOptions``. Under ``torchrun`` every process trains
(DDP, SyncBatchNorm); the first one evaluates and writes the report.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Literal

import lightning as L
from torch.utils.data import DataLoader

from mls.checkpoints.pretrained import backbone_info, load_backbone
from mls.eval.results import summarise, write_report
from mls.transfer.detection import build_detector, detection_losses, evaluate_detection
from mls.transfer.detection_data import CocoInstances, DetectionSplits, collate_lists, load_detection_splits
from mls.transfer.segmentation import DILATABLE, build_segmenter, evaluate_segmentation, segmentation_losses
from mls.transfer.segmentation_data import SegmentationPairs, segmentation_splits, segmentation_train_transform
from mls.transfer.settings import (
    DETECTION,
    SEGMENTATION,
    DetectionModel,
    DetectionProtocol,
    SegmentationModel,
    SegmentationProtocol,
)
from mls.transfer.training import RunOptions, TransferModule, TransferOptions, per_device_batch, poly, warmup_multistep

DETECT_OPTIONS = TransferOptions(DetectionModel, DETECTION, "--format")
SEGMENT_OPTIONS = TransferOptions(SegmentationModel, SEGMENTATION, "--dataset")


def _required(value: str | None, option: str) -> str:
    if not value:
        raise ValueError(f"{option} is required: the folder holding the data set")
    return value


def _repeat(run_once: Callable[[Path], dict | None], runs: int, seed: int, out: Path,
            result: dict) -> dict | None:
    """Fine-tune and evaluate ``runs`` times (seeds seed, seed+1, ...); the first process writes the report."""
    if runs < 1:
        raise ValueError(f"--runs must be at least 1, got {runs}")
    per_run = []
    for r in range(runs):
        L.seed_everything(seed + r, workers=True, verbose=False)
        scores = run_once(out / f"run{r}")
        if scores is None:  # not the first process: it only trains
            continue
        print(f"run {r + 1}/{runs}: " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()))
        per_run.append(scores)
    if not per_run:
        return None
    result = {**result, "runs": runs, "seeds": [seed + r for r in range(runs)], "per_run": per_run,
              "metrics": summarise(per_run)}
    print(write_report(out, result))
    return result


def _backbone(run: RunOptions, info: dict):
    """The pretrained backbone of ``--weights``, as ``info`` (its arch and small_stem) describes it."""
    return load_backbone(run.weights, arch=info["arch"], small_stem=info["small_stem"])[0]


def _train_then_evaluate(run: RunOptions, run_dir: Path, module: TransferModule, max_iters: int, train: DataLoader,
                         evaluate: Callable) -> dict | None:
    """Fine-tune ``module`` for ``max_iters`` on ``train`` (every process); the first process returns
    ``evaluate(device)``, every other one None."""
    trainer = run.trainer(run_dir, max_iters)
    trainer.fit(module, train)
    return evaluate(trainer.strategy.root_device) if trainer.is_global_zero else None


def _loader(run: RunOptions, **fixed) -> Callable[..., DataLoader]:
    """``DataLoader`` with ``run``'s loading processes (kept alive between epochs when there are any)."""
    workers = run.loader_workers
    return partial(DataLoader, num_workers=workers, persistent_workers=workers > 0, **fixed)


def _detection_sets(data: str | None, format: str,
                    per_device: int) -> tuple[DetectionSplits, CocoInstances, CocoInstances]:
    """The splits of ``data`` and their training and test images with objects; at least one batch to train on."""
    splits = load_detection_splits(_required(data, "--data"), format)
    categories = splits.category_ids
    train_set = CocoInstances(splits.train, splits.train_images, True, splits.has_masks, categories)
    test_set = CocoInstances(splits.test, splits.test_images, False, splits.has_masks, categories)
    if len(train_set) < per_device:
        raise ValueError(f"{len(train_set)} training images with objects, fewer than one batch of {per_device}")
    return splits, train_set, test_set


@dataclasses.dataclass(frozen=True)
class DetectionFineTuning:
    """One run of ``detect``: called with its folder, it fine-tunes a fresh detector and evaluates it."""

    run: RunOptions
    model: DetectionModel
    protocol: DetectionProtocol
    info: dict  # the backbone's arch and small_stem
    splits: DetectionSplits
    train_set: CocoInstances
    test_set: CocoInstances
    per_device: int

    def __call__(self, run_dir: Path) -> dict | None:
        """Train on the training split; the first process returns the COCOeval scores, every other one None."""
        run, model, protocol, splits = self.run, self.model, self.protocol, self.splits
        categories = splits.category_ids
        loader = _loader(run, collate_fn=collate_lists)
        detector = build_detector(_backbone(run, self.info), len(categories) + 1, splits.has_masks,
                                  protocol.train_sizes, protocol.max_size, model.fpn_channels, model.rois_per_image,
                                  model.head)
        schedule = partial(warmup_multistep, warmup_iters=protocol.warmup_iters, steps=protocol.steps)
        module = TransferModule(detector, detection_losses, protocol.lr, schedule, weight_decay=protocol.weight_decay,
                                norm_weight_decay=0.0)
        train = loader(self.train_set, batch_size=self.per_device, shuffle=True, drop_last=True)
        return _train_then_evaluate(run, run_dir, module, protocol.max_iters, train, lambda device: evaluate_detection(
            detector, loader(self.test_set, batch_size=self.per_device), splits.test, categories,
            protocol.image_size, splits.has_masks, device))

    def result(self, format: str) -> dict:
        """What the report gives besides the scores: data set, model, weights, backbone and settings."""
        name = ("mask" if self.splits.has_masks else "faster") + f"_rcnn_{self.info['arch']}_{self.model.head}"
        settings = {**dataclasses.asdict(self.protocol), **dataclasses.asdict(self.model)}
        return {"dataset": {"coco": "coco", "voc": "voc07"}[format], "protocol": name, "weights": self.run.weights,
                "arch": self.info["arch"], "small_stem": self.info["small_stem"], "settings": settings}


def _segmentation_sets(data: str | None, dataset: str, protocol: SegmentationProtocol,
                       per_device: int) -> tuple[SegmentationPairs, SegmentationPairs, int]:
    """Training pairs (randomly rescaled and cropped), test pairs and the number of classes; at least one batch."""
    train_base, test_base, num_classes, lut = segmentation_splits(_required(data, "--data"), dataset)
    augment = segmentation_train_transform(protocol.scale, protocol.crop_size, protocol.ratio_range)
    train_set = SegmentationPairs(train_base, num_classes, augment, lut)
    test_set = SegmentationPairs(test_base, num_classes, None, lut)
    if len(train_set) < per_device:
        raise ValueError(f"{len(train_set)} training images, fewer than one batch of {per_device}")
    return train_set, test_set, num_classes


@dataclasses.dataclass(frozen=True)
class SegmentationFineTuning:
    """One run of ``segment``: called with its folder, it fine-tunes a fresh segmenter and evaluates it."""

    run: RunOptions
    model: SegmentationModel
    protocol: SegmentationProtocol
    info: dict  # the backbone's arch and small_stem
    train_set: SegmentationPairs
    test_set: SegmentationPairs
    num_classes: int
    per_device: int

    def __call__(self, run_dir: Path) -> dict | None:
        """Train on the training split; the first process returns mIoU, mAcc and aAcc, every other one None."""
        run, protocol = self.run, self.protocol
        loader = _loader(run)
        segmenter = build_segmenter(_backbone(run, self.info), self.info["arch"], self.num_classes, self.model.head)
        schedule = partial(poly, max_iters=protocol.max_iters, min_ratio=protocol.min_lr / protocol.lr)
        module = TransferModule(segmenter, segmentation_losses, protocol.lr, schedule, weight_decay=protocol.weight_decay)
        train = loader(self.train_set, batch_size=self.per_device, shuffle=True, drop_last=True)
        return _train_then_evaluate(run, run_dir, module, protocol.max_iters, train, lambda device: evaluate_segmentation(
            segmenter, loader(self.test_set, batch_size=1), self.num_classes, protocol.scale, protocol.inference,
            protocol.crop_size, protocol.stride, device))

    def result(self, dataset: str) -> dict:
        """What the report gives besides the scores: data set, model, weights, backbone, classes and settings."""
        arch = self.info["arch"]
        name = f"{self.model.head}_{arch}" + ("_d8" if arch in DILATABLE else "")
        return {"dataset": dataset, "protocol": name, "weights": self.run.weights, "arch": arch,
                "small_stem": self.info["small_stem"], "num_classes": self.num_classes,
                "settings": {**dataclasses.asdict(self.protocol), **dataclasses.asdict(self.model)}}


@DETECT_OPTIONS.options
def detect(data: str | None = None, format: Literal["coco", "voc"] = "coco", **options) -> dict | None:
    """Object detection (and instance segmentation when the annotations have masks), evaluated by COCOeval.

    Mask R-CNN when the training annotations carry masks (COCO: bbox and segm AP), else Faster R-CNN
    (VOC: VOC07+12 trainval -> VOC07 test, converted to COCO format, difficult objects ignored); R-FPN or
    R-C4 (``--head``). Every layer is fine-tuned, BatchNorm trained (SyncBatchNorm on several GPUs).
    Options left unset take the protocol of ``format`` (``DETECTION``), listed in each option's help.

    Args:
        data: COCO root (annotations/instances_{train,val}2017.json, train2017/, val2017/) or a folder
            holding VOCdevkit/.
        format: the data set and its protocol: coco or voc.
    """
    run, model, protocol = DETECT_OPTIONS.settings(format, options)
    per_device = per_device_batch(protocol.batch_size, run.devices, run.num_nodes)
    splits, train_set, test_set = _detection_sets(data, format, per_device)
    info = backbone_info(run.weights, arch=run.arch, small_stem=run.small_stem)
    fine_tune = DetectionFineTuning(run, model, protocol, info, splits, train_set, test_set, per_device)
    out = Path(run.out or f"runs/transfer/detect-{format}")
    return _repeat(fine_tune, protocol.runs, run.seed, out, fine_tune.result(format))


@SEGMENT_OPTIONS.options
def segment(data: str | None = None, dataset: Literal["cityscapes", "voc-seg"] = "cityscapes",
            **options) -> dict | None:
    """Semantic segmentation with an FCN or PSPNet head (mmseg's D8 protocols), scored by mIoU, mAcc and aAcc.

    ResNet-50/101 are dilated to output stride 8; an auxiliary FCN head on layer3 adds 0.4 x its loss.
    Options left unset take the protocol of ``dataset`` (``SEGMENTATION``), listed in each option's help.

    Args:
        data: Cityscapes root (leftImg8bit/, gtFine/) or a folder holding VOCdevkit/ (SegmentationClass).
        dataset: the data set and its protocol: cityscapes (19 classes, train -> val) or voc-seg (VOC2012,
            else VOC2007, train -> val or trainval -> test).
    """
    run, model, protocol = SEGMENT_OPTIONS.settings(dataset, options)
    per_device = per_device_batch(protocol.batch_size, run.devices, run.num_nodes)
    train_set, test_set, num_classes = _segmentation_sets(data, dataset, protocol, per_device)
    info = backbone_info(run.weights, arch=run.arch, small_stem=run.small_stem)
    fine_tune = SegmentationFineTuning(run, model, protocol, info, train_set, test_set, num_classes, per_device)
    out = Path(run.out or f"runs/transfer/segment-{dataset}")
    return _repeat(fine_tune, protocol.runs, run.seed, out, fine_tune.result(dataset))
