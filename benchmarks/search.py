"""Exact nearest-neighbour search of `mls search`: torch by blocks against FAISS's exact index, time and memory
against the number of stored vectors.

Synthetic unit vectors (d = 512, float32, seeded), 100 queries against n = 1e4, 1e5 and 1e6 stored vectors, and
all against all at 1e4 (each vector's neighbours but itself), k = 10. Each case runs in a fresh process, so that
its peak memory is its own: the vectors are drawn block by block (no large temporary), then the peak resident
size (ru_maxrss) after the search, less the resident size before it, is what the search added. FAISS's time
includes building its index (a copy of the vectors), as every `mls search` does, not importing FAISS.

    OMP_NUM_THREADS=1 python benchmarks/search.py            # all cases (a few minutes, mostly drawing 1e6 vectors)
    python benchmarks/search.py --sizes 10000 100000          # fewer
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from mls.embedding.knn import faiss_installed, faiss_search, torch_search

DIM, QUERIES, K = 512, 100, 10


def resident_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def unit_vectors(n: int, seed: int) -> torch.Tensor:
    """``n`` random unit vectors, drawn 65,536 at a time into one preallocated tensor."""
    out, g = torch.empty(n, DIM), torch.Generator().manual_seed(seed)
    for start in range(0, n, 65536):
        block = torch.randn(min(65536, n - start), DIM, generator=g)
        out[start:start + len(block)] = F.normalize(block, dim=1)
    return out


def one_case(engine: str, n: int, all_against_all: bool) -> dict:
    """Run one search in this process and measure it."""
    base = unit_vectors(n, 0)
    queries, exclude = (base, torch.arange(n)) if all_against_all else (unit_vectors(QUERIES, 1), None)
    search = faiss_search if engine == "faiss" else torch_search
    if engine == "faiss":
        import faiss  # noqa: F401  (imported before the clock starts: once per `mls search`, not per search)
    before = resident_mib()
    start = time.perf_counter()
    sims, rows = search(queries, base, K, exclude)
    seconds = time.perf_counter() - start
    return {"engine": engine, "n": n, "queries": "all" if all_against_all else QUERIES, "seconds": seconds,
            "extra_mib": max(0.0, peak_mib() - before), "stored_mib": n * DIM * 4 / 2**20,
            "first": rows[0, :3].tolist()}


def run_case(engine: str, n: int, all_against_all: bool) -> dict:
    args = [sys.executable, __file__, "--case", engine, str(n), str(int(all_against_all))]
    done = subprocess.run(args, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--case", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(one_case(args.case[0], int(args.case[1]), bool(int(args.case[2])))))
        return
    engines = ["torch"] + (["faiss"] if faiss_installed() else [])
    cases = [(n, False) for n in args.sizes] + [(min(args.sizes), True)]
    print(f"exact search, d {DIM}, k {K}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"torch threads {torch.get_num_threads()}")
    print("| n | queries | " + " | ".join(f"{e} s | {e} extra MiB" for e in engines) + " | same neighbours |")
    print("|---" * (3 + 2 * len(engines)) + "|")
    for n, everything in cases:
        results = [run_case(e, n, everything) for e in engines]
        same = len({json.dumps(r["first"]) for r in results}) == 1
        print(f"| {n:,} | {results[0]['queries']} | " + " | ".join(
            f"{r['seconds']:.3f} | {r['extra_mib']:.0f}" for r in results) + f" | {'yes' if same else 'no'} |",
            flush=True)


if __name__ == "__main__":
    main()
