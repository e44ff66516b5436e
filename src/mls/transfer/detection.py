"""Detection and instance segmentation transfer: Mask R-CNN / Faster R-CNN, R-FPN or R-C4, on a pretrained ResNet.

As in the MoCo / detectron2 self-supervised protocol, every layer is fine-tuned and normalisation is
trained (BatchNorm, turned into SyncBatchNorm under DDP), never frozen. R-FPN uses torchvision's
"v2" heads (4 conv + 1 fc box head, normalised mask head), detectron2's SyncBN configuration; R-C4 is
detectron2's ``Res5ROIHeads`` layout (MoCo's VOC protocol), built from the same torchvision parts.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch import nn
from torch.utils.data import DataLoader
from torchvision.models import ResNet
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from tqdm.auto import tqdm

from mls.transfer.metrics import coco_ap

DETECTION_HEADS = ("fpn", "c4")


def build_detector(backbone: ResNet, num_classes: int, masks: bool, train_sizes: Sequence[int],
                   max_size: int, channels: int = 256, rois_per_image: int = 512, head: str = "fpn") -> nn.Module:
    """Mask R-CNN (``masks``) or Faster R-CNN on ``backbone``, R-FPN or R-C4 (``head``); ``num_classes`` counts
    background.

    ``channels`` is the width of the FPN and of the heads' convolutions (R-C4: the mask head's),
    ``rois_per_image`` the proposals sampled per image to train the heads (detectron2: 256 and 512).
    Multi-scale training draws the shorter side from ``train_sizes``. Nothing is downloaded: all but the
    backbone start random.
    """
    if head not in DETECTION_HEADS:
        raise ValueError(f"head must be one of {', '.join(DETECTION_HEADS)}, got {head!r}")
    parts = (_fpn if head == "fpn" else _c4)(backbone, num_classes, channels)
    mask_parts = {k: parts.pop(k) for k in ("mask_roi_pool", "mask_head", "mask_predictor") if k in parts}
    common = dict(box_batch_size_per_image=rois_per_image, min_size=tuple(train_sizes), max_size=max_size)
    if masks:
        return MaskRCNN(**parts, **mask_parts, **common)
    return FasterRCNN(**parts, **common)


def _fpn(backbone: ResNet, num_classes: int, channels: int) -> dict:
    """R-FPN: the four stages into an FPN (P2-P6), a 4 conv + 1 fc box head and a 4 conv mask head, with BatchNorm."""
    stage2 = backbone.inplanes // 8  # torchvision ResNet: inplanes ends as layer4's width
    body = BackboneWithFPN(backbone, {f"layer{i}": str(i - 1) for i in range(1, 5)},
                           [stage2 * 2 ** (i - 1) for i in range(1, 5)], channels,
                           extra_blocks=LastLevelMaxPool(), norm_layer=nn.BatchNorm2d)
    anchors = AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)
    return dict(
        backbone=body, rpn_anchor_generator=anchors,
        rpn_head=RPNHead(channels, anchors.num_anchors_per_location()[0], conv_depth=2),
        box_head=FastRCNNConvFCHead((channels, 7, 7), [channels] * 4, [1024], norm_layer=nn.BatchNorm2d),
        box_predictor=FastRCNNPredictor(1024, num_classes),
        mask_head=MaskRCNNHeads(channels, [channels] * 4, 1, norm_layer=nn.BatchNorm2d),
        mask_predictor=MaskRCNNPredictor(channels, channels, num_classes),
    )


class C4Backbone(nn.Module):
    """Stem and layer1-layer3 of a ResNet: one feature map ``"0"`` at stride 16 (res4), ``out_channels`` wide."""

    def __init__(self, backbone: ResNet):
        super().__init__()
        self.body = IntermediateLayerGetter(backbone, {"layer3": "0"})  # stops before layer4
        self.out_channels = backbone.layer4[0].conv1.in_channels  # layer4's input = layer3's output

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.body(x)


class Res5BoxHead(nn.Module):
    """detectron2's ``Res5ROIHeads`` box head: the backbone's own layer4 on 14 x 14 RoIs (stride 2 -> 7 x 7),
    then global average pooling."""

    def __init__(self, layer4: nn.Module):
        super().__init__()
        self.layer4 = layer4

    def forward(self, rois: torch.Tensor) -> torch.Tensor:
        return self.layer4(rois).mean((2, 3))


def _c4(backbone: ResNet, num_classes: int, channels: int) -> dict:
    """R-C4 (detectron2's ``Base-RCNN-C4``): RPN and RoIAlign on res4, layer4 as the box head.

    One feature map, so one anchor level with every size (32-512) and ratio (0.5, 1, 2), and detectron2's
    default proposal counts (12000 / 6000 before NMS, 2000 / 1000 after, train / test). The mask head differs
    from detectron2's, which upsamples res5's output of the positive boxes: here torchvision's 4 conv mask head
    with BatchNorm runs on its own 14 x 14 RoIs of res4 (``channels`` wide), so that layer4 serves the box
    head only and torchvision's ``RoIHeads`` need no change.
    """
    body = C4Backbone(backbone)
    anchors = AnchorGenerator(((32, 64, 128, 256, 512),), ((0.5, 1.0, 2.0),))
    return dict(
        backbone=body, rpn_anchor_generator=anchors,
        rpn_head=RPNHead(body.out_channels, anchors.num_anchors_per_location()[0]),
        rpn_pre_nms_top_n_train=12000, rpn_pre_nms_top_n_test=6000,
        rpn_post_nms_top_n_train=2000, rpn_post_nms_top_n_test=1000,
        box_roi_pool=MultiScaleRoIAlign(["0"], 14, 0),
        box_head=Res5BoxHead(backbone.layer4),
        box_predictor=FastRCNNPredictor(backbone.inplanes, num_classes),  # inplanes ends as layer4's width
        mask_roi_pool=MultiScaleRoIAlign(["0"], 14, 0),
        mask_head=MaskRCNNHeads(body.out_channels, [channels] * 4, 1, norm_layer=nn.BatchNorm2d),
        mask_predictor=MaskRCNNPredictor(channels, channels, num_classes),
    )


def detection_losses(detector: nn.Module, batch: tuple) -> dict[str, torch.Tensor]:
    """torchvision's named losses (RPN, box, mask) of one batch of images and targets."""
    images, targets = batch
    return detector(list(images), list(targets))


@torch.no_grad()
def predict_coco(detector: nn.Module, loader: DataLoader, category_ids: Sequence[int],
                 device: torch.device | str = "cpu") -> dict[str, list[dict]]:
    """COCO result dicts of every test image: ``"bbox"`` boxes and, for Mask R-CNN, ``"segm"`` RLE masks."""
    detector.to(device).eval()
    results: dict[str, list[dict]] = {"bbox": [], "segm": []}
    for images, targets in tqdm(loader, desc="detect", leave=False, disable=None):
        outputs = detector([image.to(device) for image in images])
        for target, out in zip(targets, outputs):
            out = {k: v.cpu() for k, v in out.items()}
            boxes = out["boxes"].clone()
            boxes[:, 2:] -= boxes[:, :2]  # xyxy -> xywh
            common = [{"image_id": target["image_id"], "category_id": category_ids[int(label) - 1],
                       "score": float(score)} for label, score in zip(out["labels"], out["scores"])]
            results["bbox"] += [{**c, "bbox": [float(v) for v in box]} for c, box in zip(common, boxes)]
            if "masks" in out:
                results["segm"] += [{**c, "segmentation": rle} for c, rle in zip(common, _rle(out["masks"]))]
    return results


def _rle(probabilities: torch.Tensor) -> list[dict]:
    """Mask R-CNN's soft masks (N x 1 x H x W) thresholded at 0.5, as COCO run-length encodings."""
    binary = (probabilities[:, 0] > 0.5).numpy().astype(np.uint8)
    rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0))) if len(binary) else []
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return list(rles)


def evaluate_detection(detector: nn.Module, loader: DataLoader, coco_gt: COCO, category_ids: Sequence[int],
                       test_size: int, masks: bool, device: torch.device | str = "cpu") -> dict[str, float]:
    """COCOeval AP, AP50, AP75 (percentages) for boxes, and for masks when ``masks`` (Mask R-CNN).

    Images are rescaled to a shorter side of ``test_size``; predictions are mapped back to the original size.
    """
    train_sizes = detector.transform.min_size
    detector.transform.min_size = (test_size,)
    try:
        results = predict_coco(detector, loader, category_ids, device)
    finally:
        detector.transform.min_size = train_sizes
    return {f"{iou_type}_{name}": value for iou_type in (("bbox", "segm") if masks else ("bbox",))
            for name, value in coco_ap(coco_gt, results[iou_type], iou_type).items()}
