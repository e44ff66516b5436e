"""Real two-process gloo runs: queues gathered in rank order, and 2 ranks x B == 1 rank x 2B."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from conftest import fill_queue, tiny

B = 4


def global_batch():
    g = torch.Generator().manual_seed(5)
    x1 = torch.randn(2 * B, 3, 16, 16, generator=g)
    x2 = x1 + 0.1 * torch.randn(x1.shape, generator=g)
    meta = {"index": torch.arange(100, 100 + 2 * B), "box": torch.rand(2 * B, 4, generator=g)}
    return x1, x2, meta


def prepared_model(shuffle_bn):
    """Same weights and queue everywhere; BN on running statistics, so that a batch split
    across ranks sees the same normalisation as the whole batch on one rank."""
    model = tiny(shuffle_bn=shuffle_bn, topk=3)
    fill_queue(model)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    return model


def step(model, x1, x2, meta):
    out = model(x1, x2, meta)
    out["loss"].backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    queue = {name: model.module.queue[name].clone() if hasattr(model, "module") else model.queue[name].clone()
             for name in ("g", "z", "index", "box")}
    return float(out["loss"].detach()), grads, queue


def worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    x1, x2, meta = global_batch()
    part = slice(rank * B, (rank + 1) * B)
    results = {}
    for shuffle_bn in (False, True):
        torch.manual_seed(123)  # the shuffle permutation is drawn on rank 0 and broadcast
        model = nn.parallel.DistributedDataParallel(prepared_model(shuffle_bn), broadcast_buffers=False)
        results[shuffle_bn] = step(model, x1[part], x2[part], {k: v[part] for k, v in meta.items()})
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.distributed
def test_two_ranks_match_one_rank_with_the_global_batch(tmp_path):
    mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    x1, x2, meta = global_batch()
    loss_ref, grads_ref, queue_ref = step(prepared_model(False), x1, x2, meta)
    for shuffle_bn in (False, True):
        losses = [r[shuffle_bn][0] for r in ranks]
        # each rank's loss is the mean over its half: their mean is the global mean
        assert sum(losses) / 2 == pytest.approx(loss_ref, rel=1e-5)
        for r in ranks:
            _, grads, queue = r[shuffle_bn]
            for g, g_ref in zip(grads, grads_ref):  # DDP averages gradients across ranks
                assert torch.allclose(g, g_ref, atol=1e-5, rtol=1e-4)
            # identical queues on every rank, holding the keys of rank 0 then rank 1
            assert queue["index"][: 2 * B].tolist() == list(range(100, 100 + 2 * B))
            for name in ("g", "z", "box"):
                assert torch.allclose(queue[name], queue_ref[name], atol=1e-5)
