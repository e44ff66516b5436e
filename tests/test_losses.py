"""Each loss against a straightforward loop over queries and queue entries."""
import math

import pytest
import torch

from mls.method.losses import bce, bce_pos, infonce, knn_softmax


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def random_case(n=3, d=7, dz=5, k=2, seed=0, invalid=(1, 4)):
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(n, dz, generator=g), dim=1)
    kp = torch.nn.functional.normalize(torch.randn(n, dz, generator=g), dim=1)
    queue = torch.nn.functional.normalize(torch.randn(d, dz, generator=g), dim=1)
    labels = torch.zeros(n, d)
    for i in range(n):
        labels[i, torch.randperm(d, generator=g)[:k]] = 1
    valid = torch.ones(d, dtype=torch.bool)
    valid[list(invalid)] = False
    return q, kp, queue, labels, valid


def loop_infonce(q, kp, queue, valid, tau):
    total = 0.0
    for i in range(len(q)):
        pos = float(q[i] @ kp[i]) / tau
        terms = [pos] + [float(q[i] @ queue[j]) / tau for j in range(len(queue)) if valid[j]]
        total += -(pos - math.log(sum(math.exp(t) for t in terms)))
    return total / len(q)


def loop_bce(p, y, valid, tau, pos_only=False, balanced=False, bias=0.0):
    total = 0.0
    d_valid = int(valid.sum())
    for i in range(p.shape[0]):
        pos_sum = neg_sum = 0.0
        n_pos = n_neg = 0
        for j in range(p.shape[1]):
            if not valid[j]:
                continue
            x = float(p[i, j]) / tau + bias
            if y[i, j] == 1:
                pos_sum += -log_sigmoid(x)
                n_pos += 1
            else:
                neg_sum += -log_sigmoid(-x)
                n_neg += 1
        if pos_only:
            total += pos_sum / d_valid
        elif balanced:
            total += pos_sum / max(n_pos, 1) + neg_sum / max(n_neg, 1)
        else:
            total += (pos_sum + neg_sum) / d_valid
    return total / p.shape[0]


def loop_knn(p, y, valid, tau):
    total = 0.0
    for i in range(p.shape[0]):
        denom = sum(math.exp(float(p[i, j]) / tau) for j in range(p.shape[1]) if valid[j])
        pos = [j for j in range(p.shape[1]) if valid[j] and y[i, j] == 1]
        if pos:
            total += -sum(math.log(math.exp(float(p[i, j]) / tau) / denom) for j in pos) / len(pos)
    return total / p.shape[0]


@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("tau", [0.2, 0.5])
def test_infonce_matches_loop(use_mask, tau):
    q, kp, queue, _, valid = random_case()
    valid = valid if use_mask else torch.ones_like(valid)
    got = infonce(q, kp, queue, tau, valid if use_mask else None)
    assert float(got) == pytest.approx(loop_infonce(q, kp, queue, valid, tau), rel=1e-5)


@pytest.mark.parametrize("k", [0, 1, 3])
@pytest.mark.parametrize("use_mask", [False, True])
def test_bce_family_matches_loop(k, use_mask):
    q, _, queue, y, valid = random_case(k=k, seed=k)
    valid = valid if use_mask else torch.ones_like(valid)
    mask_arg = valid if use_mask else None
    p, tau = q @ queue.T, 0.2
    assert float(bce(p, y, tau, mask_arg)) == pytest.approx(loop_bce(p, y, valid, tau), rel=1e-5)
    assert float(bce(p, y, tau, mask_arg, balanced=True)) == pytest.approx(
        loop_bce(p, y, valid, tau, balanced=True), rel=1e-5
    )
    assert float(bce_pos(p, y, tau, mask_arg)) == pytest.approx(
        loop_bce(p, y, valid, tau, pos_only=True), rel=1e-5, abs=1e-7
    )
    assert float(knn_softmax(p, y, tau, mask_arg)) == pytest.approx(loop_knn(p, y, valid, tau), rel=1e-5, abs=1e-7)


def test_k_zero_hand_values():
    """Without positives BCE-pos and k-NN are 0, and BCE is the mean of log(1 + e^{p/τ})."""
    p = torch.tensor([[0.0, 0.2]])
    y = torch.zeros(1, 2)
    assert float(bce_pos(p, y, 0.2)) == 0.0
    assert float(knn_softmax(p, y, 0.2)) == 0.0
    expected = (math.log(2) + math.log(1 + math.e)) / 2
    assert float(bce(p, y, 0.2)) == pytest.approx(expected, rel=1e-6)


def test_invalid_entries_take_no_part():
    """Entries outside ``valid`` can hold anything — huge logits, positive labels — without effect."""
    q, kp, queue, y, valid = random_case(d=9, invalid=(0, 5, 8))
    p = q @ queue.T
    p_dirty, y_dirty, queue_dirty = p.clone(), y.clone(), queue.clone()
    p_dirty[:, ~valid] = 50.0
    y_dirty[:, ~valid] = 1
    queue_dirty[~valid] = q[0]
    for fn in (bce, bce_pos, knn_softmax):
        assert float(fn(p_dirty, y_dirty, 0.2, valid)) == pytest.approx(float(fn(p[:, valid], y[:, valid], 0.2)), rel=1e-6)
    assert float(infonce(q, kp, queue_dirty, 0.2, valid)) == pytest.approx(float(infonce(q, kp, queue[valid], 0.2)), rel=1e-6)


def test_knn_softmax_gradient_is_contradictory_but_bce_is_not():
    """Supplement Eq. 11-14 with N_pos = 2: under the k-NN softmax each positive's term pushes
    the query away from the other positive, and a dominant positive is even pushed away
    overall; under BCE the gradient pulls the query towards every positive."""
    tau = 0.2
    p = torch.tensor([[0.9, 0.5, 0.1, -0.2, 0.0]], requires_grad=True)  # p_i = q·k_i
    both = torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0]])
    only_first = torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0]])

    # The first positive's term alone (one term of Eq. 14, scaled by N_pos): minimising it lowers q·k+^2.
    (grad_first_term,) = torch.autograd.grad(knn_softmax(p, only_first, tau), p)
    assert grad_first_term[0, 1] > 0  # descent direction -grad lowers p_2: q is pushed from k+^2
    # The whole Eq. 10: dL/dp_1 = (softmax_1 - 1/2)/τ > 0 when k+^1 dominates — a positive pushed away.
    (grad_knn,) = torch.autograd.grad(knn_softmax(p, both, tau), p)
    softmax = torch.softmax(p.detach() / tau, dim=1)
    assert softmax[0, 0] > 0.5
    assert grad_knn[0, 0] == pytest.approx(float(softmax[0, 0] - 0.5) / tau, rel=1e-5)
    assert grad_knn[0, 0] > 0
    # BCE (Eq. 9): dL/dp_i = (σ(p_i/τ) − 1)/(τD) < 0 for every positive: all are pulled closer.
    (grad_bce,) = torch.autograd.grad(bce(p, both, tau), p)
    expected = (torch.sigmoid(p.detach()[0, :2] / tau) - 1) / (tau * 5)
    assert torch.allclose(grad_bce[0, :2], expected, rtol=1e-5)
    assert (grad_bce[0, :2] < 0).all()



@pytest.mark.parametrize("pos_only", [False, True])
def test_a_logit_bias_shifts_every_sigmoid_score(pos_only):
    q, _, queue, labels, valid = random_case(n=4, d=9, k=2)
    p, b = q @ queue.T, math.log(2 / (9 - 2))
    got = bce_pos(p, labels, 0.2, valid, bias=b) if pos_only else bce(p, labels, 0.2, valid, bias=b)
    assert float(got) == pytest.approx(loop_bce(p, labels, valid, 0.2, pos_only=pos_only, bias=b), rel=1e-5)


def test_the_prior_bias_makes_the_negatives_cheap_at_the_start():
    """At p = 0, Eq. 9 costs log 2 per entry; with b = log(k/(D-k)) a negative costs -log(1 - k/D) instead."""
    d, k = 4096, 20
    labels = torch.zeros(1, d)
    labels[0, :k] = 1
    p = torch.zeros(1, d)
    b = math.log(k / (d - k))
    expected = (k * -math.log(k / d) + (d - k) * -math.log(1 - k / d)) / d
    assert float(bce(p, labels, 0.2, bias=b)) == pytest.approx(expected, rel=1e-5)
    assert float(bce(p, labels, 0.2)) == pytest.approx(math.log(2), rel=1e-5)


def test_infonce_with_one_mask_per_query_leaves_those_entries_out_of_its_denominator():
    q, kp, queue, labels, valid = random_case(n=3, d=7, k=2)
    per_query = valid[None, :] & ~labels.bool()  # e.g. each query's pseudo-positives removed
    expected = sum(loop_infonce(q[i:i + 1], kp[i:i + 1], queue, per_query[i], 0.2) for i in range(3)) / 3
    assert float(infonce(q, kp, queue, 0.2, per_query)) == pytest.approx(expected, rel=1e-5)
