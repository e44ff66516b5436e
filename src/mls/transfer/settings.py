"""The settings of the transfer commands, declared once: name, type, default, one-line doc and check.

Each field below is an option of ``mls transfer detect`` or ``mls transfer segment`` (``--max-iters``,
``--fpn-channels``), with its doc as the option's help; ``--config configs/transfer_*.yaml`` sets them too.
A protocol's fields without a default take each data set's value from ``DETECTION`` / ``SEGMENTATION``
(the paper's schedules), which the help lists. A new setting is one field here (plus, if it has a range,
one check in ``__post_init__``), then read where it is used.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mls.method.settings import NO_DEFAULT, setting
from mls.transfer.detection import DETECTION_HEADS
from mls.transfer.segmentation import SEGMENTATION_HEADS
from mls.transfer.training import check_positive


def _check_head(head: str, heads: tuple[str, ...]) -> None:
    if head not in heads:
        raise ValueError(f"--head must be one of {', '.join(heads)}, got {head!r}")


@dataclass(frozen=True)
class DetectionModel:
    """The detector built on the pretrained backbone (detectron2's sizes by default)."""

    head: Literal["fpn", "c4"] = setting(
        "fpn", "fpn (R-FPN) or c4 (R-C4: RPN and RoIAlign on res4, layer4 as the box head, as detectron2's R50-C4 "
               "and MoCo's VOC protocol)")
    fpn_channels: int = setting(
        256, "width of the FPN and of the heads' convolutions, with c4 the mask head's (detectron2: 256; less for "
             "CPU smoke runs)")
    rois_per_image: int = setting(512, "proposals sampled per image to train the box head (detectron2: 512)")

    def __post_init__(self):
        _check_head(self.head, DETECTION_HEADS)
        check_positive(fpn_channels=self.fpn_channels, rois_per_image=self.rois_per_image)


@dataclass(frozen=True, kw_only=True)
class DetectionProtocol:
    """A detectron2-style schedule: SGD, linear warm-up, x0.1 at ``steps``; multi-scale training sizes."""

    runs: int = setting(NO_DEFAULT, "fine-tuning runs averaged in the report")
    max_iters: int = setting(NO_DEFAULT, "training iterations")
    steps: tuple[int, ...] = setting(NO_DEFAULT, "iterations where the learning rate drops x0.1", list[int])
    warmup_iters: int = setting(NO_DEFAULT, "iterations of linear warm-up from 0.001 x lr")
    batch_size: int = setting(16, "images per iteration over all GPUs")
    lr: float = setting(0.02, "base learning rate of SGD, momentum 0.9")
    weight_decay: float = setting(1e-4, "weight decay, none on normalisation layers")
    image_size: int = setting(NO_DEFAULT, "shorter image side at test time")
    train_sizes: tuple[int, ...] = setting(NO_DEFAULT, "shorter sides drawn at random in training", list[int])
    max_size: int = setting(1333, "longest image side")

    def __post_init__(self):
        check_positive(lr=self.lr, image_size=self.image_size, max_size=self.max_size,
                       **{f"train_sizes[{i}]": s for i, s in enumerate(self.train_sizes)})


DETECTION = {
    # Mask R-CNN R50-FPN 1x (detectron2): 90k iterations, batch 16, lr 0.02, steps 60k/80k, 640-800 px.
    "coco": DetectionProtocol(runs=1, max_iters=90_000, steps=(60_000, 80_000), warmup_iters=1000, image_size=800,
                              train_sizes=tuple(range(640, 801, 32))),
    # MoCo's VOC07+12 protocol: 24k iterations, batch 16, lr 0.02, steps 18k/22k, 480-800 px; 5 runs, as the paper.
    "voc": DetectionProtocol(runs=5, max_iters=24_000, steps=(18_000, 22_000), warmup_iters=100, image_size=800,
                             train_sizes=tuple(range(480, 801, 32))),
}


@dataclass(frozen=True)
class SegmentationModel:
    """The segmentation head on the (dilated) pretrained backbone."""

    head: Literal["fcn", "pspnet"] = setting(
        "fcn", "fcn (mmseg's fcn_r50-d8) or pspnet (pspnet_r50-d8: pyramid pooling, bins 1, 2, 3, 6)")

    def __post_init__(self):
        _check_head(self.head, SEGMENTATION_HEADS)


@dataclass(frozen=True, kw_only=True)
class SegmentationProtocol:
    """An mmsegmentation FCN-D8 schedule: SGD, poly decay to ``min_lr``, random rescale and crop."""

    runs: int = setting(3, "fine-tuning runs averaged in the report")
    max_iters: int = setting(NO_DEFAULT, "training iterations")
    batch_size: int = setting(NO_DEFAULT, "images per iteration over all GPUs")
    lr: float = setting(0.01, "base learning rate of SGD, momentum 0.9, poly decay with power 0.9")
    min_lr: float = setting(1e-4, "learning rate at the end of the poly decay")
    weight_decay: float = setting(5e-4, "weight decay")
    scale: tuple[int, int] = setting(
        NO_DEFAULT, "(height, width) images are fitted into before the random ratio, and at test time", list[int])
    crop_size: int = setting(NO_DEFAULT, "side of the square training crops")
    ratio_range: tuple[float, float] = setting(
        (0.5, 2.0), "range of the random rescaling ratio in training", list[float])
    inference: Literal["slide", "whole"] = setting(
        NO_DEFAULT, "slide (crop_size windows, stride apart, logits averaged) or whole image")
    stride: int = setting(NO_DEFAULT, "stride of the sliding windows")

    def __post_init__(self):
        if len(self.scale) != 2 or len(self.ratio_range) != 2:
            raise ValueError(f"--scale needs (height, width) and --ratio-range (low, high); got {list(self.scale)} "
                             f"and {list(self.ratio_range)}")
        check_positive(lr=self.lr, crop_size=self.crop_size, stride=self.stride,
                       scale_height=self.scale[0], scale_width=self.scale[1])


SEGMENTATION = {
    # fcn_r50-d8_4xb2-40k_cityscapes-769x769 (80k: --max-iters 80000).
    "cityscapes": SegmentationProtocol(max_iters=40_000, batch_size=8, scale=(1024, 2048), crop_size=769,
                                       inference="slide", stride=513),
    # fcn_r50-d8_4xb4-20k_voc12aug-512x512.
    "voc-seg": SegmentationProtocol(max_iters=20_000, batch_size=16, scale=(512, 2048), crop_size=512,
                                    inference="whole", stride=341),
}
