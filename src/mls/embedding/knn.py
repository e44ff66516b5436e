"""Exact k nearest neighbours by cosine similarity: in torch by blocks (memory bounded), or with FAISS's exact
inner-product index (``faiss-cpu``, the extra ``mls-ssl[faiss]``) when it is installed.

Both score the cosine (rows L2-normalised on the way, in float32, whatever the stored type), and both are
exact: they differ in speed and memory only (docs/benchmarks.md: search), and agree on the neighbours up to ties and rounding.
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import Tensor

QUERY_BLOCK = 1024  # queries scored at once
BASE_BLOCK = 16384  # stored vectors scored at once: a block of scores is QUERY_BLOCK x BASE_BLOCK floats (64 MiB)


def faiss_installed() -> bool:
    return importlib.util.find_spec("faiss") is not None


def pick_engine(engine: str) -> str:
    """``auto``: torch, which was as fast or faster than FAISS's exact index at every size measured (1e4 to 1e6
    vectors, 100 queries or all against all at 1e4; docs/benchmarks.md) and needs no copy of the vectors;
    ``faiss`` without FAISS is refused in one line."""
    if engine == "faiss" and not faiss_installed():
        raise ValueError("--engine faiss needs FAISS: pip install 'mls-ssl[faiss]' (or use --engine torch)")
    return "torch" if engine == "auto" else engine


def _merge(best: tuple[Tensor, Tensor], scores: Tensor, offset: int, k: int) -> tuple[Tensor, Tensor]:
    """The top k of the best so far and a new block of scores whose columns start at row ``offset``."""
    top = scores.topk(min(k, scores.shape[1]), dim=1)
    sims, rows = torch.cat([best[0], top.values], 1), torch.cat([best[1], top.indices + offset], 1)
    keep = sims.topk(min(k, sims.shape[1]), dim=1).indices
    return sims.gather(1, keep), rows.gather(1, keep)


def torch_search(queries: Tensor, base: Tensor, k: int, exclude: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Cosines and rows (M x k, nearest first) of each query's k nearest rows of ``base`` (N x d), exactly.

    The scores are computed in float32, QUERY_BLOCK x BASE_BLOCK at a time (each block of ``base`` normalised
    as it is read), keeping a running top k, so the memory beyond the inputs stays bounded whatever N.
    ``exclude`` (M,): a row of ``base`` each query skips (its own, in an all-against-all search).
    """
    k = min(k, len(base) - (exclude is not None))
    sims_out, rows_out = [], []
    for q0 in range(0, len(queries), QUERY_BLOCK):
        q = F.normalize(queries[q0:q0 + QUERY_BLOCK].float(), dim=1)
        best = (q.new_empty(len(q), 0), torch.empty(len(q), 0, dtype=torch.long))
        for b0 in range(0, len(base), BASE_BLOCK):
            scores = q @ F.normalize(base[b0:b0 + BASE_BLOCK].float(), dim=1).T
            if exclude is not None:
                own = exclude[q0:q0 + QUERY_BLOCK] - b0
                inside = (own >= 0) & (own < scores.shape[1])
                scores[inside.nonzero().squeeze(1), own[inside]] = float("-inf")
            best = _merge(best, scores, b0, k)
        sims_out.append(best[0])
        rows_out.append(best[1])
    return torch.cat(sims_out), torch.cat(rows_out)


def faiss_search(queries: Tensor, base: Tensor, k: int, exclude: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The same as ``torch_search`` through ``faiss.IndexFlatIP`` (exact); ``exclude`` asks one neighbour more
    and drops the excluded row."""
    import faiss

    index = faiss.IndexFlatIP(base.shape[1])
    index.add(F.normalize(base.float(), dim=1).numpy())
    wanted = min(k + (exclude is not None), len(base))
    sims, rows = index.search(F.normalize(queries.float(), dim=1).numpy(), wanted)
    sims, rows = torch.from_numpy(sims), torch.from_numpy(rows).long()
    if exclude is None:
        return sims[:, :k], rows[:, :k]
    keep = rows != exclude[:, None]
    keep &= keep.cumsum(1) <= min(k, len(base) - 1)  # the excluded row was not found among near ties: drop the last
    n = min(k, len(base) - 1)
    return sims[keep].reshape(-1, n), rows[keep].reshape(-1, n)


def exact_search(queries: Tensor, base: Tensor, k: int, engine: str = "auto",
                 exclude: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """k nearest rows of ``base`` for each query by cosine, with ``engine`` (``pick_engine``)."""
    search = faiss_search if pick_engine(engine) == "faiss" else torch_search
    return search(queries, base, k, exclude)
