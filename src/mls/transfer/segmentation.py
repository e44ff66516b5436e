"""Semantic segmentation transfer: an FCN or PSPNet head on a pretrained (dilated) ResNet, mmseg's D8 protocols.

torchvision's ``FCN`` with its ``FCNHead`` on layer4, or PSPNet (mmseg's ``PSPHead``: a pyramid pooling
module on layer4), each with an auxiliary ``FCNHead`` on layer3 (loss weight 0.4); ResNet-50/101 keep
output stride 8 by dilating layer3 and layer4, as FCN-D8 and PSPNet-D8 do.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassConfusionMatrix
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation._utils import _SimpleSegmentationModel
from torchvision.models.segmentation.fcn import FCN, FCNHead
from tqdm.auto import tqdm

from mls.transfer.metrics import segmentation_scores
from mls.transfer.segmentation_data import IGNORE_PIXEL

INFERENCE = ("whole", "slide")
SEGMENTATION_HEADS = ("fcn", "pspnet")


DILATABLE = ("resnet50", "resnet101")  # torchvision's BasicBlock (resnet18/34) refuses dilation


def dilated(backbone: torchvision.models.ResNet, arch: str) -> torchvision.models.ResNet:
    """The same weights in a ResNet whose layer3 and layer4 trade their stride for dilation 2 and 4 (D8)."""
    if arch not in DILATABLE:
        raise ValueError(f"only {', '.join(DILATABLE)} can be dilated, got {arch!r}")
    net = getattr(torchvision.models, arch)(weights=None, replace_stride_with_dilation=[False, True, True])
    net.conv1, net.maxpool, net.fc = backbone.conv1, backbone.maxpool, nn.Identity()  # keeps a small stem
    net.load_state_dict(backbone.state_dict())
    return net


def _body(backbone: torchvision.models.ResNet, arch: str) -> tuple[IntermediateLayerGetter, int]:
    """layer3 (``"aux"``) and layer4 (``"out"``) of the backbone, dilated when ``arch`` allows; layer4's width."""
    if arch in DILATABLE:
        backbone = dilated(backbone, arch)
    channels = backbone.layer4[-1].conv1.in_channels  # a block's input = its stage's output channels
    return IntermediateLayerGetter(backbone, {"layer3": "aux", "layer4": "out"}), channels


def build_fcn(backbone: torchvision.models.ResNet, arch: str, num_classes: int) -> FCN:
    """FCN with an auxiliary head, dilated when ``arch`` allows; forward gives ``{"out", "aux"}`` at input size."""
    body, channels = _body(backbone, arch)
    return FCN(body, FCNHead(channels, num_classes), FCNHead(channels // 2, num_classes))


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class PSPHead(nn.Module):
    """mmseg's ``PSPHead`` (Zhao et al., 2017): per bin, adaptive average pooling to ``bin x bin``, 1x1 conv,
    BN, ReLU, bilinear upsampling back; the pooled maps are concatenated with the input, fused by a 3x3
    conv-BN-ReLU bottleneck and classified by a 1x1 conv after dropout 0.1."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, bins: Sequence[int] = (1, 2, 3, 6)):
        super().__init__()
        self.pyramid = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(b), *_conv_bn_relu(in_channels, channels, 1))
                                     for b in bins)
        self.bottleneck = _conv_bn_relu(in_channels + len(bins) * channels, channels, 3)
        self.classifier = nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(channels, num_classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = [F.interpolate(level(x), size=size, mode="bilinear", align_corners=False) for level in self.pyramid]
        return self.classifier(self.bottleneck(torch.cat([x, *pooled], 1)))


class PSPNet(_SimpleSegmentationModel):
    """PSPNet-D8: a ``PSPHead`` on layer4 and an auxiliary ``FCNHead`` on layer3, as torchvision's ``FCN``
    wires its heads; forward gives ``{"out", "aux"}`` at input size."""


def build_pspnet(backbone: torchvision.models.ResNet, arch: str, num_classes: int) -> PSPNet:
    """mmseg's pspnet_r50-d8 on ``backbone``: PPM bins (1, 2, 3, 6) 512 wide for ResNet-50 (a quarter of
    layer4's width), auxiliary FCN head 256 wide on layer3 (torchvision's ``FCNHead``: a quarter of 1024)."""
    body, channels = _body(backbone, arch)
    return PSPNet(body, PSPHead(channels, channels // 4, num_classes), FCNHead(channels // 2, num_classes))


def build_segmenter(backbone: torchvision.models.ResNet, arch: str, num_classes: int, head: str = "fcn") -> nn.Module:
    """``build_fcn`` or ``build_pspnet`` by ``head``."""
    if head not in SEGMENTATION_HEADS:
        raise ValueError(f"head must be one of {', '.join(SEGMENTATION_HEADS)}, got {head!r}")
    return (build_fcn if head == "fcn" else build_pspnet)(backbone, arch, num_classes)


def segmentation_losses(model: nn.Module, batch: tuple, aux_weight: float = 0.4) -> dict[str, torch.Tensor]:
    """Cross-entropy of the main and the auxiliary head, the ignore label left out."""
    images, labels = batch
    out = model(images)
    return {"loss_ce": F.cross_entropy(out["out"], labels, ignore_index=IGNORE_PIXEL),
            "loss_aux": aux_weight * F.cross_entropy(out["aux"], labels, ignore_index=IGNORE_PIXEL)}


def slide_logits(model: nn.Module, image: torch.Tensor, num_classes: int, crop: int, stride: int) -> torch.Tensor:
    """mmseg's sliding-window inference: average the logits of overlapping ``crop`` windows ``stride`` apart."""
    n, _, h, w = image.shape
    logits = image.new_zeros(n, num_classes, h, w)
    count = image.new_zeros(1, 1, h, w)
    rows = max(h - crop + stride - 1, 0) // stride + 1
    cols = max(w - crop + stride - 1, 0) // stride + 1
    for r in range(rows):
        for c in range(cols):
            y1, x1 = min(r * stride, max(h - crop, 0)), min(c * stride, max(w - crop, 0))
            y2, x2 = min(y1 + crop, h), min(x1 + crop, w)
            logits[:, :, y1:y2, x1:x2] += model(image[:, :, y1:y2, x1:x2])["out"]
            count[:, :, y1:y2, x1:x2] += 1
    return logits / count


@torch.no_grad()
def predict_logits(model: nn.Module, image: torch.Tensor, num_classes: int, scale: Sequence[int] | None = None,
                   mode: str = "whole", crop: int = 769, stride: int = 513) -> torch.Tensor:
    """Logits at the image's own size; the image is first fitted into ``scale`` (h, w) as in mmseg's test."""
    if mode not in INFERENCE:
        raise ValueError(f"inference mode must be one of {', '.join(INFERENCE)}, got {mode!r}")
    size = image.shape[-2:]
    if scale is not None:
        ratio = min(scale[0] / size[0], scale[1] / size[1])
        resized = (round(size[0] * ratio), round(size[1] * ratio))
        if resized != tuple(size):
            image = F.interpolate(image, size=resized, mode="bilinear", align_corners=False)
    logits = model(image)["out"] if mode == "whole" else slide_logits(model, image, num_classes, crop, stride)
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False) if logits.shape[-2:] != size \
        else logits


def evaluate_segmentation(model: nn.Module, loader: DataLoader, num_classes: int, scale: Sequence[int] | None = None,
                          mode: str = "whole", crop: int = 769, stride: int = 513,
                          device: torch.device | str = "cpu") -> dict[str, float]:
    """mIoU, mAcc and aAcc (percentages) over the test set, from one confusion matrix (ignore label excluded)."""
    model.to(device).eval()
    confmat = MulticlassConfusionMatrix(num_classes, ignore_index=IGNORE_PIXEL).to(device)
    for images, labels in tqdm(loader, desc="segment", leave=False, disable=None):
        logits = predict_logits(model, images.to(device), num_classes, scale, mode, crop, stride)
        confmat.update(logits.argmax(1), labels.to(device))
    return segmentation_scores(confmat.compute().cpu())
