"""The health measures (mls.method.health) against independent computations: numpy, written-out loops, autograd."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mls import MLS
from mls.method import health
from mls.method.extra_losses import EXTRA_LOSSES
from mls.method.losses import bce, bce_pos, infonce_from_logits, knn_softmax


def unit_rows(n, d, seed=0):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_mean_norm_and_spread_match_numpy():
    z = unit_rows(50, 8)
    valid = torch.arange(50) < 40
    x = z[:40].numpy().astype(np.float64)
    assert health.mean_norm(z, valid).item() == pytest.approx(np.linalg.norm(x.mean(0)), rel=1e-5)
    # lightly's std_of_l2_normalized (std over rows, unbiased, mean over dims) times √d
    assert health.spread(z, valid).item() == pytest.approx(x.std(0, ddof=1).mean() * math.sqrt(8), rel=1e-5)
    same = z[:1].expand(50, 8)
    assert health.mean_norm(same, valid).item() == pytest.approx(1.0, abs=1e-6)
    assert health.spread(same, valid).item() == pytest.approx(0.0, abs=1e-6)


def test_uniformity_matches_a_loop_over_pairs():
    z = unit_rows(12, 5, seed=1)
    valid = torch.tensor([True] * 9 + [False] * 3)
    terms = [math.exp(-2 * float(((z[i] - z[j]) ** 2).sum())) for i in range(9) for j in range(9) if i != j]
    assert health.uniformity(z, valid).item() == pytest.approx(math.log(sum(terms) / len(terms)), rel=1e-5)
    collapsed = z[:1].expand(12, 5)
    assert health.uniformity(collapsed, valid).item() == pytest.approx(0.0, abs=1e-5)


def test_effective_rank_matches_numpy_svd():
    x = torch.randn(30, 6, generator=torch.Generator().manual_seed(2)) * torch.tensor([5.0, 3, 1, 1, 0.1, 0.01])
    for m in (x, x.T):  # tall and wide
        s = np.linalg.svd(m.numpy().astype(np.float64), compute_uv=False)
        p = s / s.sum() + 1e-7
        assert health.effective_rank(m).item() == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-4)
    one_direction = torch.randn(20, 1) * torch.randn(1, 8)
    assert health.effective_rank(one_direction).item() == pytest.approx(1.0, abs=1e-3)
    assert health.effective_rank(torch.eye(8)).item() == pytest.approx(8.0, rel=1e-4)
    padded = torch.cat([x, torch.zeros(10, 6)])  # unwritten queue rows (zeroed) change nothing
    assert health.effective_rank(padded).item() == pytest.approx(health.effective_rank(x).item(), rel=1e-5)


def logits_and_labels(n=4, d=16, k=3, seed=3):
    gen = torch.Generator().manual_seed(seed)
    q, bank = unit_rows(n, 8, seed), unit_rows(d, 8, seed + 1)
    labels = torch.zeros(n, d)
    labels.scatter_(1, torch.randperm(d, generator=gen)[: k].expand(n, k), 1.0)
    valid = torch.arange(d) < d - 2
    return q, bank, labels * valid, valid


def autograd_on_logits(loss_fn, logits):
    p = logits.clone().requires_grad_(True)
    loss_fn(p).backward()
    return p.grad * len(logits)  # per query: the batch mean divides by N


@pytest.mark.parametrize("balanced", [False, True])
@pytest.mark.parametrize("bias", [0.0, -2.0])
def test_bce_gradient_split_matches_autograd(balanced, bias):
    q, bank, y, valid = logits_and_labels()
    logits, tau = q @ bank.T, 0.2
    pos, neg = EXTRA_LOSSES["bce"].logit_grads(logits, y, tau, valid, balanced=balanced, bias=bias)
    total = autograd_on_logits(lambda p: bce(p, y, tau, valid, balanced=balanced, bias=bias), logits)
    torch.testing.assert_close(pos + neg, total)
    # the positive terms alone: Eq. 9 restricted to y = 1, written out
    mask = valid.float()
    w_pos = 1 / y.sum(1, keepdim=True) if balanced else 1 / mask.sum()
    pos_only = autograd_on_logits(
        lambda p: -(w_pos * y * F.logsigmoid(p / tau + bias)).sum(1).mean(), logits)
    torch.testing.assert_close(pos, pos_only)
    assert (neg * y).abs().sum() == 0 and (pos * (1 - y)).abs().sum() == 0


def test_bce_pos_and_knn_gradients_match_autograd():
    q, bank, y, valid = logits_and_labels(seed=5)
    logits, tau = q @ bank.T, 0.1
    pos, neg = EXTRA_LOSSES["bce_pos"].logit_grads(logits, y, tau, valid)
    torch.testing.assert_close(pos, autograd_on_logits(lambda p: bce_pos(p, y, tau, valid), logits))
    assert neg.abs().sum() == 0
    pos, neg = EXTRA_LOSSES["knn"].logit_grads(logits, y, tau, valid)
    torch.testing.assert_close(pos + neg, autograd_on_logits(lambda p: knn_softmax(p, y, tau, valid), logits))
    assert (neg[:, ~valid]).abs().sum() == 0


def test_forces_on_z1_match_autograd_through_the_normalisation():
    """The logged norms are of the gradient along the sphere: autograd through F.normalize at a unit vector."""
    q, bank, y, valid = logits_and_labels(seed=7)
    k = unit_rows(len(q), 8, seed=9)
    tau = 0.2
    u = q.clone().requires_grad_(True)
    z = F.normalize(u, dim=1)
    (infonce_from_logits((z * k).sum(1), z @ bank.T, tau, valid) * len(q)).backward()
    expected_infonce = u.grad.norm(dim=1).mean()
    u.grad = None
    z = F.normalize(u, dim=1)
    (bce(z @ bank.T, y, tau, valid) * len(q)).backward()
    expected_extra = u.grad.norm(dim=1).mean()

    extra = EXTRA_LOSSES["bce"].logit_grads(q @ bank.T, y, tau, valid)
    out = health.step_forces(q, k, bank, q @ bank.T, tau, valid, extra=extra, labels=y)
    assert out["grad_infonce"].item() == pytest.approx(expected_infonce.item(), rel=1e-4)
    both = health.tangent_norm((extra[0] + extra[1]) @ bank, q)
    assert both.item() == pytest.approx(expected_extra.item(), rel=1e-4)
    assert out["alignment"].item() == pytest.approx(((q - k) ** 2).sum(1).mean().item(), rel=1e-5)
    logits = (q @ bank.T) / tau
    negatives = valid.float() - y
    assert out["logit_pos"].item() == pytest.approx((logits * y).sum().item() / y.sum().item(), rel=1e-5)
    assert out["logit_neg"].item() == pytest.approx((logits * negatives).sum().item() / negatives.sum().item(),
                                                    rel=1e-5)


@pytest.mark.parametrize("method", ["mls", "mocov2"])
def test_the_model_reports_health_only_when_asked(method):
    torch.manual_seed(0)
    model = MLS(arch="resnet18", small_stem=True, queue_size=24, topk=3, dim=16, method=method)
    x = torch.randn(8, 3, 16, 16)
    assert "health" not in model(x, x)
    out = model(x, x, diagnose=True)["health"]
    queue_measures = {"mean_norm", "uniformity", "rank_z", "spread_z", "alignment", "grad_infonce"}
    extra = {"rank_g", "grad_extra_pos", "grad_extra_neg", "logit_pos", "logit_neg"}
    assert set(out) == (queue_measures | extra if method == "mls" else queue_measures)
    assert all(torch.isfinite(v) for v in out.values())


def test_measuring_health_does_not_change_training():
    """No random draw and no change to the queues: a run that logs health learns what one that does not learns."""
    results = []
    for diagnose in (False, True):
        torch.manual_seed(0)
        model = MLS(arch="resnet18", small_stem=True, queue_size=12, topk=3, dim=16)
        x = torch.randn(4, 3, 16, 16)
        for _ in range(4):
            model(x, x, diagnose=diagnose)["loss"].backward()
            torch.randn(1)
        results.append((model.queue["z"].clone(), model.backbone_q.conv1.weight.grad.clone(), torch.randn(3)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)
