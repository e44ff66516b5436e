"""What MLS needs from torch.distributed: gathering keys, and MoCo's shuffle-BN.

Every function is a no-op in a single process, so the method runs unchanged on one CPU.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


@torch.no_grad()
def gather(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` from all ranks in rank order (no gradient); every rank gets the same.

    All ranks must pass tensors of the same shape (the data loader drops the last
    incomplete batch, as in MoCo).
    """
    if world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def shuffle_batch(x: Tensor) -> tuple[Tensor, Tensor]:
    """Shuffle-BN, step 1 (MoCo): gather the batch, permute it globally, keep this rank's share.

    Returns the local share and the permutation that ``unshuffle_batch`` inverts, so the
    key encoder's BN statistics mix samples of all ranks and cannot leak the positive.
    """
    x_all = gather(x)
    perm = torch.randperm(len(x_all), device=x.device)
    if world_size() > 1:
        dist.broadcast(perm, src=0)
    local = perm.view(world_size(), -1)[rank()]
    return x_all[local], perm


@torch.no_grad()
def unshuffle_batch(x: Tensor, perm: Tensor) -> Tensor:
    """Shuffle-BN, step 2: gather the keys and put this rank's back in their original order."""
    x_all = gather(x)
    restore = torch.argsort(perm).view(world_size(), -1)[rank()]
    return x_all[restore]
