"""Detection and instance segmentation transfer: Mask R-CNN / Faster R-CNN R-FPN on a pretrained ResNet.

As in the MoCo / detectron2 self-supervised protocol, every layer is fine-tuned and normalisation is
trained (BatchNorm, turned into SyncBatchNorm under DDP), never frozen. The heads are torchvision's
"v2" R-FPN heads (4 conv + 1 fc box head, normalised mask head), detectron2's SyncBN configuration.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch import nn
from torch.utils.data import DataLoader
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from mls.transfer.metrics import coco_ap


def build_detector(backbone: nn.Module, num_classes: int, masks: bool, train_sizes: Sequence[int],
                   max_size: int, channels: int = 256, rois_per_image: int = 512) -> nn.Module:
    """Mask R-CNN (``masks``) or Faster R-CNN with an FPN on ``backbone``; ``num_classes`` counts background.

    ``channels`` is the width of the FPN and of the heads' convolutions, ``rois_per_image`` the proposals
    sampled per image to train the heads (detectron2: 256 and 512). Multi-scale training draws the shorter
    side from ``train_sizes``. Nothing is downloaded: all but the backbone start random.
    """
    stage2 = backbone.inplanes // 8  # torchvision ResNet: inplanes ends as layer4's width
    body = BackboneWithFPN(backbone, {f"layer{i}": str(i - 1) for i in range(1, 5)},
                           [stage2 * 2 ** (i - 1) for i in range(1, 5)], channels,
                           extra_blocks=LastLevelMaxPool(), norm_layer=nn.BatchNorm2d)
    anchors = AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)
    heads = dict(
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(channels, anchors.num_anchors_per_location()[0], conv_depth=2),
        box_head=FastRCNNConvFCHead((channels, 7, 7), [channels] * 4, [1024], norm_layer=nn.BatchNorm2d),
        box_predictor=FastRCNNPredictor(1024, num_classes),
        box_batch_size_per_image=rois_per_image, min_size=tuple(train_sizes), max_size=max_size,
    )
    if masks:
        mask_head = MaskRCNNHeads(channels, [channels] * 4, 1, norm_layer=nn.BatchNorm2d)
        mask_predictor = MaskRCNNPredictor(channels, channels, num_classes)
        return MaskRCNN(body, mask_head=mask_head, mask_predictor=mask_predictor, **heads)
    return FasterRCNN(body, **heads)


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
    for images, targets in loader:
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
