"""``mls transfer {detect,segment}``: fine-tune a pretrained backbone on dense tasks, repeat, and report.

Each protocol's paper schedule is the default (``DETECTION``, ``SEGMENTATION``); every option overrides
it, and ``--config configs/transfer_*.yaml`` sets several at once. The options both commands share
(weights, hardware, output, seed) are declared once, in ``RunOptions``. Under ``torchrun`` every process
trains (DDP, SyncBatchNorm); the first one evaluates and writes the report.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Literal

import lightning as L
from torch.utils.data import DataLoader

from mls.checkpoint import backbone_info, load_backbone
from mls.eval.report import summarise, write_report
from mls.transfer.detection import DETECTION_HEADS, build_detector, detection_losses, evaluate_detection
from mls.transfer.detection_data import CocoInstances, DetectionSplits, collate_lists, load_detection_splits
from mls.transfer.segmentation import DILATABLE, SEGMENTATION_HEADS, build_segmenter, evaluate_segmentation, segmentation_losses
from mls.transfer.segmentation_data import SegmentationPairs, segmentation_splits, segmentation_train_transform
from mls.transfer.training import (
    RunOptions,
    TransferModule,
    check_positive,
    per_device_batch,
    poly,
    warmup_multistep,
    with_run_options,
)


@dataclasses.dataclass(frozen=True)
class DetectionProtocol:
    """A detectron2-style schedule: SGD, linear warm-up, x0.1 at ``steps``; multi-scale training sizes."""

    runs: int
    max_iters: int
    steps: tuple[int, ...]
    warmup_iters: int
    train_sizes: tuple[int, ...]
    image_size: int  # shorter side at test time
    max_size: int = 1333
    batch_size: int = 16
    lr: float = 0.02
    weight_decay: float = 1e-4


DETECTION = {
    # Mask R-CNN R50-FPN 1x (detectron2): 90k iterations, batch 16, lr 0.02, steps 60k/80k, 640-800 px.
    "coco": DetectionProtocol(1, 90_000, (60_000, 80_000), 1000, tuple(range(640, 801, 32)), 800),
    # MoCo's VOC07+12 protocol: 24k iterations, batch 16, lr 0.02, steps 18k/22k, 480-800 px.
    "voc": DetectionProtocol(5, 24_000, (18_000, 22_000), 100, tuple(range(480, 801, 32)), 800),
}


@dataclasses.dataclass(frozen=True)
class SegmentationProtocol:
    """An mmsegmentation FCN-D8 schedule: SGD, poly decay to ``min_lr``, random rescale and crop."""

    max_iters: int
    batch_size: int
    scale: tuple[int, int]  # (h, w) the images are fitted into, before the random ratio
    crop_size: int
    inference: str  # "slide" (crop_size windows, stride apart) or "whole"
    stride: int
    runs: int = 3
    lr: float = 0.01
    min_lr: float = 1e-4
    weight_decay: float = 5e-4
    ratio_range: tuple[float, float] = (0.5, 2.0)


SEGMENTATION = {
    # fcn_r50-d8_4xb2-40k_cityscapes-769x769 (80k: --max-iters 80000).
    "cityscapes": SegmentationProtocol(40_000, 8, (1024, 2048), 769, "slide", 513),
    # fcn_r50-d8_4xb4-20k_voc12aug-512x512.
    "voc-seg": SegmentationProtocol(20_000, 16, (512, 2048), 512, "whole", 341),
}


def _protocol(table: dict, key: str, option: str, **options):
    """The protocol ``table[key]`` with every option that was given (not None) in place of its default."""
    if key not in table:
        raise ValueError(f"{option} must be one of {', '.join(table)}, got {key!r}")
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items() if v is not None}
    return dataclasses.replace(table[key], **given)


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


def _check_head(head: str, heads: tuple[str, ...]) -> None:
    if head not in heads:
        raise ValueError(f"--head must be one of {', '.join(heads)}, got {head!r}")


def _loader(run: RunOptions, **fixed) -> Callable[..., DataLoader]:
    """``DataLoader`` with ``run``'s loading processes (kept alive between epochs when there are any)."""
    workers = run.loader_workers
    return partial(DataLoader, num_workers=workers, persistent_workers=workers > 0, **fixed)


def _detection_protocol(format: str, head: str, fpn_channels: int, rois_per_image: int,
                        **options) -> DetectionProtocol:
    """``DETECTION[format]`` with the options given, once ``head`` is known and every size and rate is positive."""
    _check_head(head, DETECTION_HEADS)
    protocol = _protocol(DETECTION, format, "--format", **options)
    check_positive(lr=protocol.lr, image_size=protocol.image_size, max_size=protocol.max_size,
                   fpn_channels=fpn_channels, rois_per_image=rois_per_image,
                   **{f"train_sizes[{i}]": s for i, s in enumerate(protocol.train_sizes)})
    return protocol


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
    protocol: DetectionProtocol
    info: dict  # the backbone's arch and small_stem
    splits: DetectionSplits
    train_set: CocoInstances
    test_set: CocoInstances
    per_device: int
    head: str
    fpn_channels: int
    rois_per_image: int

    def __call__(self, run_dir: Path) -> dict | None:
        """Train on the training split; the first process returns the COCOeval scores, every other one None."""
        run, protocol, splits, categories = self.run, self.protocol, self.splits, self.splits.category_ids
        loader = _loader(run, collate_fn=collate_lists)
        backbone, _, _ = load_backbone(run.weights, arch=self.info["arch"], small_stem=self.info["small_stem"])
        detector = build_detector(backbone, len(categories) + 1, splits.has_masks, protocol.train_sizes,
                                  protocol.max_size, self.fpn_channels, self.rois_per_image, self.head)
        schedule = partial(warmup_multistep, warmup_iters=protocol.warmup_iters, steps=protocol.steps)
        module = TransferModule(detector, detection_losses, protocol.lr, schedule, weight_decay=protocol.weight_decay,
                                norm_weight_decay=0.0)
        trainer = run.trainer(run_dir, protocol.max_iters)
        trainer.fit(module, loader(self.train_set, batch_size=self.per_device, shuffle=True, drop_last=True))
        if not trainer.is_global_zero:
            return None
        return evaluate_detection(detector, loader(self.test_set, batch_size=self.per_device), splits.test,
                                  categories, protocol.image_size, splits.has_masks, trainer.strategy.root_device)

    def result(self, format: str) -> dict:
        """What the report gives besides the scores: data set, model, weights, backbone and settings."""
        name = ("mask" if self.splits.has_masks else "faster") + f"_rcnn_{self.info['arch']}_{self.head}"
        settings = {**dataclasses.asdict(self.protocol), "head": self.head, "fpn_channels": self.fpn_channels,
                    "rois_per_image": self.rois_per_image}
        return {"dataset": {"coco": "coco", "voc": "voc07"}[format], "protocol": name, "weights": self.run.weights,
                "arch": self.info["arch"], "small_stem": self.info["small_stem"], "settings": settings}


def _segmentation_protocol(dataset: str, head: str, **options) -> SegmentationProtocol:
    """``SEGMENTATION[dataset]`` with the options given, once ``head`` is known and the sizes and rate are valid."""
    _check_head(head, SEGMENTATION_HEADS)
    protocol = _protocol(SEGMENTATION, dataset, "--dataset", **options)
    if len(protocol.scale) != 2 or len(protocol.ratio_range) != 2:
        raise ValueError(f"--scale needs (height, width) and --ratio-range (low, high); got {list(protocol.scale)} "
                         f"and {list(protocol.ratio_range)}")
    check_positive(lr=protocol.lr, crop_size=protocol.crop_size, stride=protocol.stride,
                   scale_height=protocol.scale[0], scale_width=protocol.scale[1])
    return protocol


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
    protocol: SegmentationProtocol
    info: dict  # the backbone's arch and small_stem
    train_set: SegmentationPairs
    test_set: SegmentationPairs
    num_classes: int
    per_device: int
    head: str

    def __call__(self, run_dir: Path) -> dict | None:
        """Train on the training split; the first process returns mIoU, mAcc and aAcc, every other one None."""
        run, protocol = self.run, self.protocol
        loader = _loader(run)
        backbone, _, _ = load_backbone(run.weights, arch=self.info["arch"], small_stem=self.info["small_stem"])
        model = build_segmenter(backbone, self.info["arch"], self.num_classes, self.head)
        schedule = partial(poly, max_iters=protocol.max_iters, min_ratio=protocol.min_lr / protocol.lr)
        module = TransferModule(model, segmentation_losses, protocol.lr, schedule, weight_decay=protocol.weight_decay)
        trainer = run.trainer(run_dir, protocol.max_iters)
        trainer.fit(module, loader(self.train_set, batch_size=self.per_device, shuffle=True, drop_last=True))
        if not trainer.is_global_zero:
            return None
        return evaluate_segmentation(model, loader(self.test_set, batch_size=1), self.num_classes, protocol.scale,
                                     protocol.inference, protocol.crop_size, protocol.stride,
                                     trainer.strategy.root_device)

    def result(self, dataset: str) -> dict:
        """What the report gives besides the scores: data set, model, weights, backbone, classes and settings."""
        arch = self.info["arch"]
        name = f"{self.head}_{arch}" + ("_d8" if arch in DILATABLE else "")
        return {"dataset": dataset, "protocol": name, "weights": self.run.weights, "arch": arch,
                "small_stem": self.info["small_stem"], "num_classes": self.num_classes,
                "settings": {**dataclasses.asdict(self.protocol), "head": self.head}}


@with_run_options
def detect(data: str | None = None, format: Literal["coco", "voc"] = "coco", head: Literal["fpn", "c4"] = "fpn",
           runs: int | None = None, max_iters: int | None = None, steps: list[int] | None = None,
           warmup_iters: int | None = None, batch_size: int | None = None, lr: float | None = None,
           weight_decay: float | None = None, image_size: int | None = None, train_sizes: list[int] | None = None,
           max_size: int | None = None, fpn_channels: int = 256, rois_per_image: int = 512,
           **run_options) -> dict | None:
    """Object detection (and instance segmentation when the annotations have masks), evaluated by COCOeval.

    Mask R-CNN when the training annotations carry masks (COCO: bbox and segm AP), else Faster R-CNN
    (VOC: VOC07+12 trainval -> VOC07 test, converted to COCO format, difficult objects ignored); R-FPN or
    R-C4 (``--head``). Every layer is fine-tuned, BatchNorm trained (SyncBatchNorm on several GPUs).

    Args:
        data: COCO root (annotations/instances_{train,val}2017.json, train2017/, val2017/) or a folder
            holding VOCdevkit/.
        format: coco or voc.
        head: fpn (R-FPN, the default) or c4 (R-C4: RPN and RoIAlign on res4, layer4 as the box head, as
            detectron2's R50-C4 and MoCo's VOC protocol).
        runs: fine-tuning runs averaged in the report (default: 1 for coco, 5 for voc, as in the paper).
        max_iters: training iterations (default: 90000 coco, 24000 voc).
        steps: iterations where the learning rate drops x0.1 (default: 60000 80000 coco, 18000 22000 voc).
        warmup_iters: iterations of linear warm-up (default: 1000 coco, 100 voc).
        batch_size: images per iteration over all GPUs (default: 16).
        lr: base learning rate of SGD, momentum 0.9 (default: 0.02).
        weight_decay: weight decay, none on normalisation layers (default: 1e-4).
        image_size: shorter image side at test time (default: 800).
        train_sizes: shorter sides drawn at random in training (default: 640..800 coco, 480..800 voc, step 32).
        max_size: longest image side (default: 1333).
        fpn_channels: width of the FPN and of the heads' convolutions, with c4 the mask head's (detectron2: 256;
            less for CPU smoke runs).
        rois_per_image: proposals sampled per image to train the box head (detectron2: 512).
    """
    run = RunOptions(**run_options)
    protocol = _detection_protocol(format, head, fpn_channels, rois_per_image, runs=runs, max_iters=max_iters,
                                   steps=steps, warmup_iters=warmup_iters, batch_size=batch_size, lr=lr,
                                   weight_decay=weight_decay, image_size=image_size, train_sizes=train_sizes,
                                   max_size=max_size)
    per_device = per_device_batch(protocol.batch_size, run.devices, run.num_nodes)
    splits, train_set, test_set = _detection_sets(data, format, per_device)
    info = backbone_info(run.weights, arch=run.arch, small_stem=run.small_stem)
    fine_tune = DetectionFineTuning(run, protocol, info, splits, train_set, test_set, per_device, head, fpn_channels,
                                    rois_per_image)
    out = Path(run.out or f"runs/transfer/detect-{format}")
    return _repeat(fine_tune, protocol.runs, run.seed, out, fine_tune.result(format))


@with_run_options
def segment(data: str | None = None, dataset: Literal["cityscapes", "voc-seg"] = "cityscapes",
            head: Literal["fcn", "pspnet"] = "fcn",
            runs: int | None = None, max_iters: int | None = None, batch_size: int | None = None,
            lr: float | None = None, min_lr: float | None = None, weight_decay: float | None = None,
            scale: list[int] | None = None, crop_size: int | None = None, ratio_range: list[float] | None = None,
            inference: Literal["slide", "whole"] | None = None, stride: int | None = None,
            **run_options) -> dict | None:
    """Semantic segmentation with an FCN or PSPNet head (mmseg's D8 protocols), scored by mIoU, mAcc and aAcc.

    ResNet-50/101 are dilated to output stride 8; an auxiliary FCN head on layer3 adds 0.4 x its loss.

    Args:
        data: Cityscapes root (leftImg8bit/, gtFine/) or a folder holding VOCdevkit/ (SegmentationClass).
        dataset: cityscapes (19 classes, train -> val) or voc-seg (VOC2012, else VOC2007, train -> val
            or trainval -> test).
        head: fcn (mmseg's fcn_r50-d8, the default) or pspnet (pspnet_r50-d8: pyramid pooling, bins 1, 2, 3, 6).
        runs: fine-tuning runs averaged in the report (default: 3, as in the paper).
        max_iters: training iterations (default: 40000 cityscapes, 20000 voc-seg).
        batch_size: images per iteration over all GPUs (default: 8 cityscapes, 16 voc-seg).
        lr: base learning rate of SGD, momentum 0.9, poly decay with power 0.9 (default: 0.01).
        min_lr: learning rate at the end of the poly decay (default: 1e-4).
        weight_decay: weight decay (default: 5e-4).
        scale: (height, width) images are fitted into before the random ratio, and at test time
            (default: 1024 2048 cityscapes, 512 2048 voc-seg).
        crop_size: side of the square training crops (default: 769 cityscapes, 512 voc-seg).
        ratio_range: range of the random rescaling ratio in training (default: 0.5 2.0).
        inference: slide (crop_size windows) or whole image (default: slide cityscapes, whole voc-seg).
        stride: stride of the sliding windows (default: 513 cityscapes).
    """
    run = RunOptions(**run_options)
    protocol = _segmentation_protocol(dataset, head, runs=runs, max_iters=max_iters, batch_size=batch_size, lr=lr,
                                      min_lr=min_lr, weight_decay=weight_decay, scale=scale, crop_size=crop_size,
                                      ratio_range=ratio_range, inference=inference, stride=stride)
    per_device = per_device_batch(protocol.batch_size, run.devices, run.num_nodes)
    train_set, test_set, num_classes = _segmentation_sets(data, dataset, protocol, per_device)
    info = backbone_info(run.weights, arch=run.arch, small_stem=run.small_stem)
    fine_tune = SegmentationFineTuning(run, protocol, info, train_set, test_set, num_classes, per_device, head)
    out = Path(run.out or f"runs/transfer/segment-{dataset}")
    return _repeat(fine_tune, protocol.runs, run.seed, out, fine_tune.result(dataset))
