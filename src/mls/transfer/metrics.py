"""Transfer metrics: COCO AP through pycocotools, and mIoU / mAcc / aAcc from a confusion matrix."""
from __future__ import annotations

import contextlib
import io

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

IOU_TYPES = ("bbox", "segm")


def coco_from_dict(dataset: dict) -> COCO:
    """A pycocotools ``COCO`` index over an annotation dict held in memory (no JSON file)."""
    for key in ("images", "annotations", "categories"):
        if key not in dataset:
            raise ValueError(f"a COCO annotation dict needs an {key!r} list, got keys {sorted(dataset)}")
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_ap(coco_gt: COCO, detections: list[dict], iou_type: str = "bbox") -> dict[str, float]:
    """AP, AP50 and AP75 (percentages) of ``detections`` by COCOeval.

    ``detections`` are COCO result dicts: ``image_id``, ``category_id``, ``score`` and
    ``bbox`` (x, y, w, h) or ``segmentation`` (RLE). No detection at all scores 0.
    """
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {', '.join(IOU_TYPES)}, got {iou_type!r}")
    if not detections:
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(detections)
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        evaluator.params.imgIds = sorted(coco_gt.getImgIds())
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # stats[0:3] are AP@[.5:.95], AP@.5, AP@.75 over all areas; -1 means no ground truth.
    return {name: _percent(value) for name, value in zip(("AP", "AP50", "AP75"), evaluator.stats[:3])}


def _percent(value: float) -> float:
    return float("nan") if value < 0 else float(value) * 100.0


def segmentation_scores(confmat: torch.Tensor | np.ndarray) -> dict[str, float]:
    """mIoU, mAcc and aAcc (percentages) from a confusion matrix (rows: ground truth, columns: prediction).

    As in mmsegmentation, a class absent from both ground truth and prediction is left
    out of the mIoU mean, and a class absent from the ground truth out of the mAcc mean.
    """
    confmat = torch.as_tensor(confmat, dtype=torch.float64)
    if confmat.ndim != 2 or confmat.shape[0] != confmat.shape[1]:
        raise ValueError(f"confusion matrix must be square (classes x classes), got shape {tuple(confmat.shape)}")
    if confmat.sum() == 0:
        raise ValueError("confusion matrix is empty: no labelled pixel was evaluated")
    hits = confmat.diag()
    gt = confmat.sum(1)
    union = gt + confmat.sum(0) - hits
    iou = hits / union  # 0/0 -> nan for classes never seen nor predicted
    acc = hits / gt
    return {
        "mIoU": 100.0 * float(iou.nanmean()),
        "mAcc": 100.0 * float(acc.nanmean()),
        "aAcc": 100.0 * float(hits.sum() / confmat.sum()),
    }
