"""The MLS module: settings, momentum update, gradient flow, wiring of queues and losses."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import fill_queue, pretrain_module, tiny, views
from mls.method.losses import bce, infonce, knn_softmax
from mls.method.selection import select_topk
from mls.train.module import PretrainModule, extra_weight_factor


def capture_encodings(model):
    """Record (g1, z1) and (g2, z2) of the next forward pass."""
    seen = {}
    enc_q, enc_k = model.encode_query, model.encode_key

    def query(x):
        seen["g1"], seen["z1"] = enc_q(x)
        return seen["g1"], seen["z1"]

    def key(x):
        seen["g2"], seen["z2"] = enc_k(x)
        return seen["g2"], seen["z2"]

    model.encode_query, model.encode_key = query, key
    return seen


@pytest.mark.parametrize(
    "setting, value",
    [("topk", 32), ("topk", 40), ("tau", 0.0), ("tau", -1.0), ("momentum", 1.0), ("momentum", -0.1),
     ("method", "simclr"), ("mls_loss", "focal"), ("select_from", "x"), ("arch", "vit_b_16"),
     ("queue_size", 0), ("extra_tau", 0.0), ("queue_g_dtype", "int8")],
)
def test_invalid_settings_raise_naming_the_setting(setting, value):
    with pytest.raises(ValueError, match=setting if setting != "arch" else "arch"):
        tiny(**{setting: value})


def test_key_encoder_is_momentum_average_after_a_step():
    model = tiny(momentum=0.9)
    with torch.no_grad():  # make key and query differ
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    pairs = [(q, k) for q_net, k_net in model.momentum_pairs() for q, k in zip(q_net.parameters(), k_net.parameters())]
    before = [(q.detach().clone(), k.detach().clone()) for q, k in pairs]
    assert len(pairs) == len(list(model.backbone_q.parameters())) + len(list(model.head_q.parameters()))
    model(*views())
    for (q, k), (q0, k0) in zip(pairs, before):
        assert torch.equal(q, q0)
        assert torch.allclose(k, 0.9 * k0 + 0.1 * q0, atol=1e-6)


def test_only_z1_carries_gradient_and_nothing_reaches_key_encoder_or_queues():
    model = tiny()
    fill_queue(model)
    seen = capture_encodings(model)
    out = model(*views())
    assert not seen["g2"].requires_grad and not seen["z2"].requires_grad
    assert not any(b.requires_grad for b in model.queue.buffers())
    assert not out["pos_sim"].requires_grad and not out["loss_extra"].requires_grad
    params = [p for p in model.parameters() if p.requires_grad]
    full = torch.autograd.grad(out["loss"], params + [seen["g1"]], retain_graph=True, allow_unused=True)
    # The loss reaches g1 only through the MLP: its gradient equals dL/dz1 pulled back through z1 alone.
    (dz1,) = torch.autograd.grad(out["loss"], seen["z1"], retain_graph=True)
    via_z1 = torch.autograd.grad(seen["z1"], params, grad_outputs=dz1, retain_graph=True, allow_unused=True)
    for a, b in zip(full[:-1], via_z1):
        assert (a is None and b is None) or torch.allclose(a, b, atol=1e-6)
    out["loss"].backward()
    assert all(p.grad is None for p in model.backbone_k.parameters())
    assert all(p.grad is None for p in model.head_k.parameters())
    assert not any(p.requires_grad for p in model.backbone_k.parameters())


@pytest.mark.parametrize("mls_loss, loss_fn", [("bce", bce), ("knn", knn_softmax)])
def test_losses_are_wired_to_the_queues_before_the_push(mls_loss, loss_fn):
    model = tiny(mls_loss=mls_loss, extra_weight=0.5, extra_tau=0.1)
    fill_queue(model)
    queue_g, queue_z = model.queue["g"].clone(), model.queue["z"].clone()
    seen = capture_encodings(model)
    out = model(*views())
    z1, z2, g1 = seen["z1"].detach(), seen["z2"], seen["g1"].detach()
    labels = select_topk(g1, queue_g, 4)
    expected_infonce = infonce(z1, z2, queue_z, 0.2)
    expected_extra = loss_fn(z1 @ queue_z.T, labels, 0.1)
    assert float(out["loss_infonce"]) == pytest.approx(float(expected_infonce), rel=1e-5)
    assert float(out["loss_extra"]) == pytest.approx(float(expected_extra), rel=1e-5)
    assert float(out["loss"]) == pytest.approx(float(expected_infonce + 0.5 * expected_extra), rel=1e-5)
    # neighbours are reported by the dataset index stored in the queue (here: the row)
    assert [set(r) for r in out["neighbor_index"].tolist()] == [set(torch.nonzero(r).flatten().tolist()) for r in labels]
    # the keys went in after the old entries: rows 0..5 now hold z2 and ĝ2 of this batch
    assert torch.allclose(model.queue["z"][:6], z2, atol=1e-6)
    assert torch.allclose(model.queue["g"][:6], F.normalize(seen["g2"], dim=1), atol=1e-6)


def test_select_from_z_uses_queue_z():
    model = tiny(select_from="z")
    assert "g" not in model.queue
    fill_queue(model)
    queue_z = model.queue["z"].clone()
    seen = capture_encodings(model)
    out = model(*views())
    chosen = select_topk(seen["z1"].detach(), queue_z, 4)
    assert [set(r) for r in out["neighbor_index"].tolist()] == [set(torch.nonzero(r).flatten().tolist()) for r in chosen]


def test_mocov2_is_infonce_only_and_keeps_no_backbone_queue():
    model = tiny(method="mocov2")
    fill_queue(model)
    out = model(*views())
    assert "g" not in model.queue
    assert float(out["loss"]) == float(out["loss_infonce"])


def test_extra_loss_waits_for_a_full_queue_when_asked():
    module = pretrain_module(dict(arch="resnet18", small_stem=True, queue_size=16, topk=4, extra_weight=1.0),
                             {"channels_last": False, "extra_start_epoch": 0, "extra_ramp_epochs": 0,
                              "extra_after_full_queue": True})
    model = module.model
    out = model(*views(), extra_weight=module.extra_weight())  # 6 of 16 written
    assert float(out["loss"]) == float(out["loss_infonce"])
    fill_queue(model)
    out = model(*views(), extra_weight=module.extra_weight())
    assert float(out["loss"]) == pytest.approx(float(out["loss_infonce"] + out["loss_extra"]), rel=1e-6)


def test_empty_queue_gives_finite_losses():
    out = tiny()(*views())
    assert torch.isfinite(out["loss"]) and float(out["queue_fill"]) == 0
    assert (out["neighbor_index"] == -1).all() and float(out["pos_sim"]) == 0  # nothing written, nothing picked


def test_a_partly_filled_queue_offers_only_its_written_entries():
    model = tiny(queue_size=16, topk=4, mls_loss="bce_pos")
    g = torch.Generator().manual_seed(5)
    rows = 3  # fewer written entries than k: every one of them is a neighbour of every query
    model.queue.push(z=F.normalize(torch.randn(rows, 128, generator=g), dim=1), index=torch.tensor([7, 8, 9]),
                     box=torch.rand(rows, 4, generator=g),
                     g=F.normalize(torch.randn(rows, model.feature_dim, generator=g), dim=1))
    queue_g, queue_z = model.queue["g"][:rows].clone(), model.queue["z"][:rows].clone()
    seen = capture_encodings(model)
    out = model(*views())
    assert out["neighbor_index"].shape == (6, 4)
    assert [sorted(r) for r in out["neighbor_index"].tolist()] == [[-1, 7, 8, 9]] * 6
    # pos_sim: the mean cosine of g1 to the three written rows, worked out directly
    expected_sim = F.normalize(seen["g1"].detach(), dim=1) @ queue_g.T
    assert float(out["pos_sim"]) == pytest.approx(float(expected_sim.mean()), rel=1e-5)
    # Eq. 15 over the three positives only: -log sigmoid(q·z_j / tau), averaged over the 6 x 3 pairs
    expected_extra = -F.logsigmoid(seen["z1"].detach() @ queue_z.T / 0.2).mean()
    assert float(out["loss_extra"]) == pytest.approx(float(expected_extra), rel=1e-5)


def test_autocast_keeps_losses_in_fp32_and_queue_g_can_be_bf16():
    model = tiny(queue_g_dtype="bfloat16")
    assert model.queue["g"].dtype == torch.bfloat16
    fill_queue(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(*views())
    assert out["loss"].dtype == torch.float32 and out["pos_sim"].dtype == torch.float32
    assert model.queue["z"].dtype == torch.float32


def test_q_g_only_scores_the_backbone_feature_against_q_g_and_its_gradient_reaches_g1():
    """Table 7, "Q_g only": labels and logits both from ĝ1·Q_gᵀ; the rows of Q_g act as the classifiers."""
    model = tiny(logits_from="g", extra_weight=0.5, extra_tau=0.1)
    fill_queue(model)
    queue_g, queue_z = model.queue["g"].clone(), model.queue["z"].clone()
    seen = capture_encodings(model)
    out = model(*views())
    g1, z1 = seen["g1"], seen["z1"]
    p = F.normalize(g1, dim=1) @ queue_g.T  # written out: cosine of g1 to each row of Q_g
    top = p.detach().topk(4, dim=1).indices
    y = torch.zeros_like(p).scatter_(1, top, 1.0)
    x = p / 0.1
    expected_extra = -(y * F.logsigmoid(x) + (1 - y) * F.logsigmoid(-x)).sum(1).div(32).mean()
    assert float(out["loss_extra"]) == pytest.approx(float(expected_extra), rel=1e-5)
    # InfoNCE stays MoCo-v2's: z against Q_z
    assert float(out["loss_infonce"]) == pytest.approx(float(infonce(z1.detach(), seen["z2"], queue_z, 0.2)), rel=1e-5)
    # d(loss)/d(g1) has a part from the extra loss directly, beside the one through the MLP and z1
    (dz1,) = torch.autograd.grad(out["loss"], z1, retain_graph=True)
    via_z1 = torch.autograd.grad(z1, g1, grad_outputs=dz1, retain_graph=True)[0]
    (total,) = torch.autograd.grad(out["loss"], g1, retain_graph=True)
    (direct,) = torch.autograd.grad(0.5 * expected_extra, g1)
    assert direct.abs().sum() > 0
    assert torch.allclose(total, via_z1 + direct, atol=1e-5)


def test_pseudo_positives_leave_infonce_only_when_asked():
    plain, masked = tiny(), tiny(mask_positives=True)
    for model in (plain, masked):
        fill_queue(model)
    queue_g, queue_z = plain.queue["g"].clone(), plain.queue["z"].clone()
    seen = capture_encodings(masked)
    out_plain, out_masked = plain(*views()), masked(*views())
    z1, z2, g1 = seen["z1"].detach(), seen["z2"], seen["g1"].detach()
    labels = select_topk(g1, queue_g, 4)
    assert float(out_plain["loss_infonce"]) == pytest.approx(float(infonce(z1, z2, queue_z, 0.2)), rel=1e-5)
    l_pos, l_neg = (z1 * z2).sum(1) / 0.2, z1 @ queue_z.T / 0.2
    expected = -(l_pos - torch.logsumexp(torch.cat([l_pos[:, None], l_neg.masked_fill(labels.bool(), -1e9)], 1), 1))
    assert float(out_masked["loss_infonce"]) == pytest.approx(float(expected.mean()), rel=1e-5)
    assert float(out_masked["loss_infonce"]) < float(out_plain["loss_infonce"])  # fewer terms in the denominator


@pytest.mark.parametrize("kind", ["fixed", "learned"])
def test_the_logit_bias_starts_at_the_prior_of_a_positive(kind):
    model = tiny(logit_bias=kind, queue_size=32, topk=4)
    assert float(model.logit_bias) == pytest.approx(math.log(4 / 28))
    assert model.logit_bias.requires_grad == (kind == "learned")
    fill_queue(model)
    out = model(*views())
    out["loss"].backward()
    assert (model.logit_bias.grad is not None) == (kind == "learned")


@pytest.mark.parametrize("epoch, start, ramp, expected", [
    (0.0, 2, 0, 0.0), (1.99, 2, 0, 0.0), (2.0, 2, 0, 1.0), (7.5, 2, 0, 1.0),   # a hard start at epoch 2
    (2.0, 2, 4, 0.0), (3.0, 2, 4, 0.25), (5.0, 2, 4, 0.75), (6.0, 2, 4, 1.0), (9.0, 2, 4, 1.0),  # a ramp
    (0.5, 0, 2, 0.25)])
def test_the_weight_of_the_extra_loss_ramps_linearly(epoch, start, ramp, expected):
    assert extra_weight_factor(epoch, start, ramp) == pytest.approx(expected)


def test_the_trainer_passes_the_scheduled_weight_to_the_model():
    module = pretrain_module(dict(arch="resnet18", small_stem=True, queue_size=16, topk=4, extra_weight=0.5),
                             {"channels_last": False, "extra_start_epoch": 1, "extra_ramp_epochs": 2,
                              "extra_after_full_queue": False}, steps_per_epoch=10)
    steps = {0: 0.0, 10: 0.0, 20: 0.25, 25: 0.375, 30: 0.5, 100: 0.5}
    for step, weight in steps.items():
        assert float(module.extra_weight(step)) == pytest.approx(weight), step


def test_a_training_step_never_waits_for_the_device(monkeypatch):
    """No .item(), float(), bool(), .tolist() or .cpu() in the step: each would stall a GPU once per step."""
    module = pretrain_module(dict(arch="resnet18", small_stem=True, queue_size=16, topk=4, logit_bias="learned",
                                       mask_positives=True),
                             {"channels_last": False, "extra_start_epoch": 0, "extra_ramp_epochs": 1,
                              "extra_after_full_queue": True}, steps_per_epoch=4)
    module.labels = torch.eye(8)[torch.arange(64) % 8].bool()
    monkeypatch.setattr(module, "log_dict", lambda *a, **k: None)
    monkeypatch.setattr(module, "log", lambda *a, **k: None)
    monkeypatch.setattr(module, "optimizers", lambda: torch.optim.SGD(module.parameters(), lr=0.1))
    module._trainer = type("Trainer", (), {"world_size": 1, "global_step": 0})()
    x1, x2 = views(8)
    batch = {"view1": x1, "view2": x2, "index": torch.arange(8), "box2": torch.rand(8, 4), "failed": torch.zeros(8)}
    calls = []
    for name in ("item", "tolist", "cpu", "__bool__", "__float__", "__int__", "numpy"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _n=name, _o=original, **k: calls.append(_n) or _o(self, *a, **k))
    for _ in range(3):  # an empty, a partly filled and a full queue
        module.training_step(batch, 0)
    monkeypatch.undo()
    assert calls == []


def _module(**train) -> PretrainModule:
    torch.manual_seed(0)
    module = pretrain_module(dict(arch="resnet18", small_stem=True, queue_size=32, topk=4, dim=32),
                             {"channels_last": False, "extra_start_epoch": 0, "extra_ramp_epochs": 0,
                              "extra_after_full_queue": False, **train})
    fill_queue(module.model)
    return module


@pytest.mark.slow
def test_a_compiled_step_gives_the_eager_steps_loss_and_gradients():
    """``compile``: torch.compile of both encoders and heads, in place. The suite traces with ``aot_eager``
    (TorchDynamo's graph capture and AOTAutograd's joint graph, as inductor gets them, without generating
    C++: that takes minutes on a CPU); the loss and every gradient agree to 1e-5 relative."""
    pytest.importorskip("torch._dynamo")
    eager, compiled = _module(), _module(compile="aot_eager")
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints interchangeable
    for net in (compiled.model.backbone_q, compiled.model.head_q, compiled.model.backbone_k, compiled.model.head_k):
        assert net._compiled_call_impl is not None
    x1, x2 = views(8)
    try:
        out_c = compiled.model(x1, x2)
    except Exception as error:  # no compiler support on this platform
        pytest.skip(f"torch.compile cannot run here: {type(error).__name__}: {error}")
    out_e = eager.model(x1, x2)
    assert float(out_e["loss_extra"]) > 0
    for name in ("loss", "loss_infonce", "loss_extra"):
        assert float(out_c[name].detach()) == pytest.approx(float(out_e[name].detach()), rel=1e-5), name
    out_c["loss"].backward(), out_e["loss"].backward()
    for (name, p_c), p_e in zip(compiled.model.named_parameters(), eager.model.parameters()):
        if p_e.grad is not None:
            torch.testing.assert_close(p_c.grad, p_e.grad, rtol=1e-5, atol=1e-6, msg=name)
