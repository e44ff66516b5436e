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
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mls.checkpoints.pretrained import backbone_info, load_backbone
from mls.eval.results import summarise, write_report
from mls.train.console import lightning_warnings_left_out
from mls.train.data_order import SeededLoader, SeededSteps
from mls.train.resume import RunRecord, checkpoint_callbacks, run_of_set
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
from mls.transfer.training import (
    LossFn,
    RunOptions,
    TransferModule,
    TransferOptions,
    per_device_batch,
    poly,
    warmup_multistep,
)

DETECT_OPTIONS = TransferOptions(DetectionModel, DETECTION, "--format")
SEGMENT_OPTIONS = TransferOptions(SegmentationModel, SEGMENTATION, "--dataset")


def _required(value: str | None, option: str) -> str:
    if not value:
        raise ValueError(f"{option} is required: the folder holding the data set")
    return value


def _repeat(run_once: Callable[[Path, int, dict], dict | None], runs: int, seed: int, out: Path,
            result: dict) -> dict | None:
    """Fine-tune and evaluate ``runs`` times (seeds seed, seed+1, ...), each run in its folder ``run{r}`` (with
    ``--resume auto``, a finished one is read back); the first process writes the report."""
    if runs < 1:
        raise ValueError(f"--runs must be at least 1, got {runs}")
    per_run = []
    # what each run's checkpoints must agree with to go on from them: all but the number of runs, and the seed
    record = {**result, "settings": {k: v for k, v in result["settings"].items() if k != "runs"}}
    for r in range(runs):
        L.seed_everything(seed + r, workers=True, verbose=False)
        scores = run_once(out / f"run{r}", seed + r, {**record, "seed": seed + r})
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


@dataclasses.dataclass(frozen=True)
class FineTuning:
    """One run of a transfer command: called with its folder, seed and settings, it fine-tunes a fresh network on the pretrained
    backbone (every process); the first process then scores it on the test set, every other one returns None."""

    run: RunOptions
    info: dict  # the backbone's arch and small_stem
    build: Callable[[nn.Module], nn.Module]  # the pretrained backbone -> the network to fine-tune
    losses: LossFn
    sgd: dict  # TransferModule's lr, lr_factor (the schedule), weight_decay and norm_weight_decay
    max_iters: int
    train_set: Dataset
    per_device: int  # training images per process and iteration
    score: Callable[..., dict]  # (network, test loader, device=...) -> the scores
    test_set: Dataset
    test_batch: int
    collate_fn: Callable | None = None
    settings: dict = dataclasses.field(default_factory=dict)  # the run's settings as resolved, for its loggers

    def __call__(self, run_dir: Path, seed: int, record: dict) -> dict | None:
        """Train on the training split (with ``--resume auto``, from where the run stopped, or not at all if it
        finished); the first process returns the scores, every other one None. ``record``: the run's settings,
        which its checkpoints keep and a resumed run must match."""
        return run_of_set(run_dir, self.run.resume, record, partial(self._train, run_dir, seed, record))

    def _train(self, run_dir: Path, seed: int, record: dict, ckpt_path: str | None) -> dict | None:
        """The run trained (its trainer and loggers made only now: a finished run read back leaves its files as
        they were), scored by the first process."""
        callbacks = [*checkpoint_callbacks(run_dir, self.run.save_every, per="step", numbered=False),
                     SeededSteps(seed), RunRecord(record)]
        trainer = self.run.trainer(run_dir, self.max_iters, callbacks, {**self.settings, **dataclasses.asdict(self.run)})
        workers = self.run.loader_workers
        backbone = load_backbone(self.run.weights, arch=self.info["arch"], small_stem=self.info["small_stem"])[0]
        network = self.build(backbone)
        module = TransferModule(network, self.losses, **self.sgd)
        data = SeededLoader(self.train_set, self.per_device, seed, workers, self.collate_fn)
        with lightning_warnings_left_out():
            trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        if not trainer.is_global_zero:
            return None
        test = DataLoader(self.test_set, batch_size=self.test_batch, num_workers=workers,
                          persistent_workers=workers > 0, collate_fn=self.collate_fn)
        return self.score(network, test, device=trainer.strategy.root_device)


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


def _detection(data: str | None, format: str, run: RunOptions, model: DetectionModel,
               protocol: DetectionProtocol) -> tuple[FineTuning, dict]:
    """A run of ``detect`` on ``data``, and what its report gives besides the scores: data set, model, weights,
    backbone and settings."""
    per_device = per_device_batch(protocol.batch_size, run.devices, run.num_nodes)
    splits, train_set, test_set = _detection_sets(data, format, per_device)
    info = backbone_info(run.weights, arch=run.arch, small_stem=run.small_stem)
    categories = splits.category_ids
    build = partial(build_detector, num_classes=len(categories) + 1, masks=splits.has_masks,
                    train_sizes=protocol.train_sizes, max_size=protocol.max_size, channels=model.fpn_channels,
                    rois_per_image=model.rois_per_image, head=model.head)
    schedule = partial(warmup_multistep, warmup_iters=protocol.warmup_iters, steps=protocol.steps)
    sgd = dict(lr=protocol.lr, lr_factor=schedule, weight_decay=protocol.weight_decay, norm_weight_decay=0.0)
    score = partial(evaluate_detection, coco_gt=splits.test, category_ids=categories, test_size=protocol.image_size,
                    masks=splits.has_masks)
    settings = {**dataclasses.asdict(protocol), **dataclasses.asdict(model)}
    fine_tune = FineTuning(run, info, build, detection_losses, sgd, protocol.max_iters, train_set, per_device, score,
                           test_set, per_device, collate_lists, settings=settings)
    name = ("mask" if splits.has_masks else "faster") + f"_rcnn_{info['arch']}_{model.head}"
    return fine_tune, {"dataset": {"coco": "coco", "voc": "voc07"}[format], "protocol": name, "weights": run.weights,
                       "arch": info["arch"], "small_stem": info["small_stem"], "settings": settings}


def _segmentation(data: str | None, dataset: str, run: RunOptions, model: SegmentationModel,
                  protocol: SegmentationProtocol) -> tuple[FineTuning, dict]:
    """A run of ``segment`` on ``data`` (training pairs randomly rescaled and cropped, at least one batch), and what
    its report gives besides the scores: data set, model, weights, backbone, classes and settings."""
    per_device = per_device_batch(protocol.batch_size, run.devices, run.num_nodes)
    train_base, test_base, num_classes, lut = segmentation_splits(_required(data, "--data"), dataset)
    augment = segmentation_train_transform(protocol.scale, protocol.crop_size, protocol.ratio_range)
    train_set = SegmentationPairs(train_base, num_classes, augment, lut)
    if len(train_set) < per_device:
        raise ValueError(f"{len(train_set)} training images, fewer than one batch of {per_device}")
    info = backbone_info(run.weights, arch=run.arch, small_stem=run.small_stem)
    build = partial(build_segmenter, arch=info["arch"], num_classes=num_classes, head=model.head)
    schedule = partial(poly, max_iters=protocol.max_iters, min_ratio=protocol.min_lr / protocol.lr)
    sgd = dict(lr=protocol.lr, lr_factor=schedule, weight_decay=protocol.weight_decay)
    score = partial(evaluate_segmentation, num_classes=num_classes, scale=protocol.scale, mode=protocol.inference,
                    crop=protocol.crop_size, stride=protocol.stride)
    settings = {**dataclasses.asdict(protocol), **dataclasses.asdict(model)}
    fine_tune = FineTuning(run, info, build, segmentation_losses, sgd, protocol.max_iters, train_set, per_device,
                           score, SegmentationPairs(test_base, num_classes, None, lut), 1, settings=settings)
    name = f"{model.head}_{info['arch']}" + ("_d8" if info["arch"] in DILATABLE else "")
    return fine_tune, {"dataset": dataset, "protocol": name, "weights": run.weights, "arch": info["arch"],
                       "small_stem": info["small_stem"], "num_classes": num_classes, "settings": settings}


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
    fine_tune, result = _detection(data, format, run, model, protocol)
    return _repeat(fine_tune, protocol.runs, run.seed, Path(run.out or f"runs/transfer/detect-{format}"), result)


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
    fine_tune, result = _segmentation(data, dataset, run, model, protocol)
    return _repeat(fine_tune, protocol.runs, run.seed, Path(run.out or f"runs/transfer/segment-{dataset}"), result)
