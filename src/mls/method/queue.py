"""One FIFO queue for every dictionary of MLS: ``Q_g``, ``Q_z`` and where each entry came from.

Fields are written together, in the same order (supplement A.2), so row ``i`` of each
field describes the same key. The buffers are persistent: a checkpoint saves and
restores the queue, and an interrupted run resumes with it intact.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from mls.method.distributed import gather


class FeatureQueue(nn.Module):
    """A ring buffer of ``size`` rows holding several aligned fields.

    ``fields`` maps a name to ``(shape of one row, dtype)``, e.g.
    ``{"g": ((2048,), torch.float32), "z": ((128,), torch.float32), "index": ((), torch.long)}``.
    """

    def __init__(self, size: int, fields: dict[str, tuple[tuple[int, ...], torch.dtype]]):
        super().__init__()
        if size < 1:
            raise ValueError(f"queue size must be positive, got {size}")
        self.size = size
        self.names = tuple(fields)
        for name, (shape, dtype) in fields.items():
            self.register_buffer(f"field_{name}", torch.zeros(size, *shape, dtype=dtype))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def __getitem__(self, name: str) -> Tensor:
        return getattr(self, f"field_{name}")

    def __contains__(self, name: str) -> bool:
        return name in self.names

    @property
    def valid(self) -> Tensor:
        """Boolean mask (size,) of rows that were written at least once."""
        return torch.arange(self.size, device=self.ptr.device) < self.count

    @property
    def full(self) -> Tensor:
        """Whether every row was written (a 0-d bool tensor: reading it needs no host sync)."""
        return self.count >= self.size

    @torch.no_grad()
    def push(self, **batch: Tensor) -> None:
        """Gather a batch from all ranks (rank order) and write it after the newest rows.

        Every field must be given. Writing wraps around the end of the buffer, so the
        batch need not divide the size; a batch larger than the queue keeps its last rows.
        """
        if set(batch) != set(self.names):
            raise ValueError(f"push needs exactly the fields {self.names}, got {tuple(batch)}")
        batch = {name: gather(t.detach()) for name, t in batch.items()}
        n = len(next(iter(batch.values())))
        if any(len(t) != n for t in batch.values()):
            raise ValueError("all fields of a queue push need the same number of rows")
        start = n - min(n, self.size)
        rows = (self.ptr + torch.arange(n - start, device=self.ptr.device)) % self.size
        for name, t in batch.items():
            self[name][rows] = t[start:].to(self[name].dtype)
        self.ptr.copy_((self.ptr + n - start) % self.size)
        self.count.copy_(torch.clamp(self.count + n - start, max=self.size))
