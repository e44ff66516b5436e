"""Transfer metrics against hand-worked cases: COCO AP through COCOeval, mIoU / mAcc / aAcc."""
import math

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from mls.transfer.metrics import coco_ap, coco_from_dict, segmentation_scores

SIZE = 40
# Two images, two categories: boxes (x, y, w, h) of 10 x 10 px.
GT_BOXES = {1: [(1, [2, 3, 10, 10]), (2, [20, 15, 10, 10])], 2: [(1, [5, 25, 10, 10])]}


def _rect_mask(x, y, w, h):
    m = np.zeros((SIZE, SIZE), dtype=np.uint8)
    m[int(y): int(y + h), int(x): int(x + w)] = 1
    return m


def _rle(m):
    rle = mask_utils.encode(np.asfortranarray(m))
    rle["counts"] = rle["counts"].decode()
    return rle


def _ground_truth(crowd_box=None):
    images = [{"id": i, "width": SIZE, "height": SIZE, "file_name": f"{i}.png"} for i in GT_BOXES]
    anns = []
    for image_id, objects in GT_BOXES.items():
        for cat, box in objects:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "bbox": box,
                         "area": box[2] * box[3], "iscrowd": 0, "segmentation": _rle(_rect_mask(*box))})
    if crowd_box is not None:
        anns.append({"id": len(anns) + 1, "image_id": 1, "category_id": 1, "bbox": crowd_box,
                     "area": crowd_box[2] * crowd_box[3], "iscrowd": 1, "segmentation": _rle(_rect_mask(*crowd_box))})
    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    return coco_from_dict({"images": images, "annotations": anns, "categories": cats})


def _detections(shift=0.0, iou_type="bbox"):
    dets = []
    for image_id, objects in GT_BOXES.items():
        for cat, (x, y, w, h) in objects:
            box = [x + shift, y, w, h]
            det = {"image_id": image_id, "category_id": cat, "score": 0.9}
            if iou_type == "bbox":
                det["bbox"] = box
            else:
                det["segmentation"] = _rle(_rect_mask(*box))
            dets.append(det)
    return dets


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_perfect_predictions_score_100(iou_type):
    scores = coco_ap(_ground_truth(), _detections(0, iou_type), iou_type)
    assert scores == pytest.approx({"AP": 100.0, "AP50": 100.0, "AP75": 100.0})


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_shift_with_iou_0_6_passes_three_of_ten_thresholds(iou_type):
    # A 10 x 10 box moved 2.5 px (segm: 2 px, whole pixels) right overlaps 7.5 x 10 = 75 of a union 125:
    # IoU = 0.6 exactly. For masks a 2 px shift gives 80 / 120 = 0.667. Hand count of thresholds passed:
    shift, passed = (2.5, 3) if iou_type == "bbox" else (2, 4)  # {.5, .55, .6} or {.5, .55, .6, .65}
    scores = coco_ap(_ground_truth(), _detections(shift, iou_type), iou_type)
    assert scores["AP50"] == pytest.approx(100.0)
    assert scores["AP75"] == pytest.approx(0.0)
    assert scores["AP"] == pytest.approx(100.0 * passed / 10)


def test_detection_on_crowd_region_is_ignored_and_no_detection_scores_zero():
    gt = _ground_truth(crowd_box=[25, 25, 12, 12])
    dets = _detections() + [{"image_id": 1, "category_id": 1, "score": 0.95, "bbox": [25, 25, 12, 12]}]
    assert coco_ap(gt, dets)["AP"] == pytest.approx(100.0)
    assert coco_ap(gt, []) == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}


def test_false_positive_ranked_first_halves_precision_at_first_recall_point():
    # Category 2 (one object): a wrong box scored above the right one -> precision 1/2 at every recall;
    # category 1 stays perfect. COCO AP = mean over categories = (1 + 0.5) / 2.
    dets = _detections() + [{"image_id": 2, "category_id": 2, "score": 0.99, "bbox": [28, 28, 10, 10]}]
    assert coco_ap(_ground_truth(), dets)["AP50"] == pytest.approx(75.0)


def test_bad_input_is_refused_in_plain_words():
    with pytest.raises(ValueError, match="iou_type"):
        coco_ap(_ground_truth(), _detections(), "keypoints")
    with pytest.raises(ValueError, match="'annotations'"):
        coco_from_dict({"images": [], "categories": []})
    with pytest.raises(ValueError, match="square"):
        segmentation_scores(torch.ones(2, 3))


def test_segmentation_scores_on_a_hand_worked_confusion_matrix():
    # rows: ground truth, columns: prediction. Class 2 never occurs nor is predicted (left out of both means).
    confmat = torch.tensor([[3, 1, 0], [2, 4, 0], [0, 0, 0]])
    # IoU0 = 3 / (4 + 5 - 3) = 1/2, IoU1 = 4 / (6 + 5 - 4) = 4/7; Acc0 = 3/4, Acc1 = 4/6; aAcc = 7/10.
    scores = segmentation_scores(confmat)
    assert scores["mIoU"] == pytest.approx(100 * (1 / 2 + 4 / 7) / 2)
    assert scores["mAcc"] == pytest.approx(100 * (3 / 4 + 4 / 6) / 2)
    assert scores["aAcc"] == pytest.approx(70.0)


def test_segmentation_scores_from_label_maps_exclude_the_ignore_label():
    from torchmetrics.classification import MulticlassConfusionMatrix

    target = torch.tensor([[0, 0, 1, 1], [1, 2, 2, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 2, 0, 0]])  # the pixel labelled 255 is predicted 0: not counted
    confmat = MulticlassConfusionMatrix(num_classes=3, ignore_index=255)(pred, target)
    # Brute force over the seven labelled pixels.
    keep = target != 255
    t, p = target[keep], pred[keep]
    ious = [((t == c) & (p == c)).sum() / ((t == c) | (p == c)).sum() for c in range(3)]
    accs = [((t == c) & (p == c)).sum() / (t == c).sum() for c in range(3)]
    scores = segmentation_scores(confmat)
    assert scores["mIoU"] == pytest.approx(100 * float(sum(ious)) / 3)
    assert scores["mAcc"] == pytest.approx(100 * float(sum(accs)) / 3)
    assert scores["aAcc"] == pytest.approx(100 * 4 / 7)  # hand count: pixels (0,0), (0,2), (0,3), (1,1) are right
    assert not math.isnan(scores["mIoU"])
