"""Metrics, losses, k-NN votes, the linear probe and the report, each against an independent computation."""
from __future__ import annotations

import math

import pytest
import torch
from sklearn.metrics import average_precision_score

from mls.eval.datasets import EvalData
from mls.eval.metrics import IGNORE, average_precision, classification_metrics, top1_accuracy, voc07_average_precision
from mls.eval.probes import Task, classification_loss, knn_scores, linear_probe
from mls.eval.results import markdown_table, summarise

I = IGNORE  # noqa: E741 (reads as a blank in the hand-worked tables below)


def test_top1_accuracy_hand_worked():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.2, 0.0], [0.3, 0.7, 0.0], [0.0, 0.1, 0.5]])
    assert top1_accuracy(scores, torch.tensor([1, 1, 1, 2])) == pytest.approx(3 / 4)


def test_voc07_eleven_point_ap_hand_worked():
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5]).repeat(4, 1).T
    targets = torch.tensor([[1, I, 0, 1], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0]])
    # class 0, ranked + - + - +: (P, R) = (1, 1/3) (1/2, 1/3) (2/3, 2/3) (1/2, 2/3) (3/5, 1):
    #   recall 0-0.3 -> best precision 1, 0.4-0.6 -> 2/3, 0.7-1 -> 3/5
    # class 1, first entry ignored, ranked + - - +: (1, 1/2) (1/2, 1/2) (1/3, 1/2) (1/2, 1):
    #   recall 0-0.5 -> 1, 0.6-1 -> 1/2
    # class 2 has no positive: left out; class 3 has one positive ranked first: AP 1
    ap = voc07_average_precision(scores.float(), targets)
    assert ap[0].item() == pytest.approx((4 * 1 + 3 * 2 / 3 + 4 * 3 / 5) / 11)
    assert ap[1].item() == pytest.approx((6 * 1 + 5 * 1 / 2) / 11)
    assert math.isnan(ap[2].item()) and ap[3].item() == pytest.approx(1.0)


def test_voc07_ap_treats_tied_scores_as_one_threshold():
    # all four scores equal: the only operating point is precision 1/4 at recall 1, whatever the order
    ap = voc07_average_precision(torch.zeros(4, 1), torch.tensor([[1], [0], [0], [0]]))
    assert ap[0].item() == pytest.approx(0.25)


def test_area_ap_matches_sklearn_with_ignored_entries_and_classes_without_positives():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(60, 6, generator=g)
    targets = (torch.rand(60, 6, generator=g) < 0.3).long()
    targets[torch.rand(60, 6, generator=g) < 0.15] = I
    targets[:, 4] = torch.where(targets[:, 4] == 1, 0, targets[:, 4])  # class 4: no positive
    expected = []
    for c in range(6):
        keep = targets[:, c] != I
        if (targets[keep, c] == 1).any():
            expected.append(average_precision_score(targets[keep, c].numpy(), scores[keep, c].numpy()))
    ap = average_precision(scores, targets)
    assert math.isnan(ap[4].item())
    assert ap[~ap.isnan()].tolist() == pytest.approx(expected, abs=1e-6)
    metrics = classification_metrics(scores, targets, multilabel=True)
    assert list(metrics) == ["mAP", "mAP_voc07"] and metrics["mAP"] == pytest.approx(100 * sum(expected) / 5, abs=1e-4)
    assert list(classification_metrics(scores, targets, multilabel=True, voc07=True)) == ["mAP_voc07", "mAP"]


def test_metrics_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="targets as N class indices"):
        top1_accuracy(torch.zeros(4, 3), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="differ in shape"):
        average_precision(torch.zeros(4, 3), torch.zeros(4, 2))


def test_masked_bce_leaves_ignored_entries_out():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    targets = torch.tensor([[1.0, I, 0.0], [0.0, 1.0, I]])
    terms = [-math.log(1 / (1 + math.exp(-2.0))), -math.log(1 - 1 / (1 + math.exp(-0.5))),
             -math.log(1 - 0.5), -math.log(1 / (1 + math.exp(-3.0)))]
    assert classification_loss(logits, targets, multilabel=True).item() == pytest.approx(sum(terms) / 4)


@pytest.mark.parametrize("multilabel", [False, True])
def test_knn_scores_match_a_brute_force_loop(multilabel):
    g = torch.Generator().manual_seed(1)
    train_x, test_x = torch.randn(40, 8, generator=g), torch.randn(7, 8, generator=g)
    if multilabel:
        train_y = (torch.rand(40, 3, generator=g) < 0.4).float()
        train_y[0, 0] = I
    else:
        train_y = torch.randint(0, 3, (40,), generator=g)
    k, t = 5, 0.07
    expected = torch.zeros(7, 3)
    for n in range(7):
        sims = [(float(test_x[n] @ train_x[j] / (test_x[n].norm() * train_x[j].norm())), j) for j in range(40)]
        for sim, j in sorted(sims, reverse=True)[:k]:
            for c in range(3):
                vote = (train_y[j, c] == 1) if multilabel else (train_y[j] == c)
                expected[n, c] += math.exp(sim / t) * float(vote)
    got = knn_scores(train_x, train_y, test_x, 3, multilabel, k=k, temperature=t, chunk=3)
    assert torch.allclose(got, expected, rtol=1e-4)


def test_linear_probe_separates_gaussian_blobs():
    g = torch.Generator().manual_seed(2)
    centres = 4 * torch.randn(3, 16, generator=g)
    labels = torch.arange(3).repeat(40)
    features = centres[labels] + torch.randn(120, 16, generator=g) + 50  # offset: standardisation must cope
    data = EvalData("blobs", None, None, ["a", "b", "c"], multilabel=False)
    task = Task("random", "resnet18", True, data, image_size=32, batch_size=32, workers=0)
    task.__dict__["features"] = (features[:90], labels[:90], features[90:], labels[90:])  # skip the backbone
    scores, targets = linear_probe(task, seed=0, epochs=20, lr=0.1)
    assert top1_accuracy(scores, targets) == 1.0


def test_summary_and_table_hand_worked():
    rows = summarise([{"mAP": 70.0, "mAP_voc07": 71.0}, {"mAP": 74.0, "mAP_voc07": 71.0}])
    assert [r["metric"] for r in rows] == ["mAP", "mAP_voc07"] and rows[0]["headline"] and not rows[1]["headline"]
    assert rows[0]["mean"] == 72.0 and rows[0]["std"] == pytest.approx(math.sqrt(8))  # sample std of 70, 74
    assert rows[1]["std"] == 0.0 and summarise([{"top1": 50.0}])[0]["std"] == 0.0
    table = markdown_table([{"dataset": "voc07", "protocol": "linear", "runs": 2, "weights": "a.ckpt", "metrics": rows}])
    assert "| voc07 | linear | mAP (headline) | 72.00 | 2.83 | 2 | a.ckpt |" in table.splitlines()


def test_area_ap_keeps_the_order_of_large_scores_such_as_knn_votes():
    """Votes of exp(cos / 0.07) reach 1e6: a sigmoid would tie them all at 1.0; sklearn ranks them."""
    g = torch.Generator().manual_seed(3)
    targets = (torch.rand(60, 3, generator=g) < 0.4).long()
    scores = torch.exp(torch.rand(60, 3, generator=g) * 14) * (1 + targets)  # large, informative, a few ties
    scores[:5] = 0.0
    expected = [average_precision_score(targets[:, c].numpy(), scores[:, c].double().numpy()) for c in range(3)]
    assert average_precision(scores, targets).tolist() == pytest.approx(expected, abs=1e-6)
