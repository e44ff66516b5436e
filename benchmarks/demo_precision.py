"""Pseudo-label precision of the CPU demo: does pretraining make Q_g's neighbours share classes?

Pretrains, at the demo's budget (configs/demo_cpu.yaml), the demo itself (MLS with balanced
BCE from epoch 2, λ = 0.25), plain Eq. 9 (one mean over all D entries, from the start, λ = 1) and
MoCo-v2; a run with learning rate 0 stands for the random initialisation. Each backbone then
embeds one random crop of each of the 2,000 scenes and, for 200 query crops, the top-20
neighbours among them are checked against the true labels (the `mls visualize neighbors
--bank dataset` search), so that every model is judged on the very same crops.

    python benchmarks/demo_precision.py --out runs/bench-precision      # about 20 minutes on 2 cores
"""
from __future__ import annotations

from pathlib import Path

from jsonargparse import CLI

from mls.data.synthetic import SyntheticScenes
from mls.neighbor_search import neighbor_precision
from mls.train import pretrain
from mls.viz.neighbors import neighbors

VARIANTS = {
    "random init (lr 0)": dict(lr=0.0, epochs=1),
    "MoCo-v2": dict(method="mocov2"),
    "MLS, Eq. 9 as written (λ = 1)": dict(bce_balanced=False, extra_start_epoch=0, extra_weight=1.0),
    "MLS, demo (balanced BCE from epoch 2, λ = 0.25)": dict(),
}


def benchmark(out: str = "runs/bench-precision", queries: int = 200, k: int = 20, seed: int = 0) -> None:
    """Pretrain each variant at the demo's budget and print the neighbour precision of each.

    Args:
        out: folder for the runs.
        queries: query crops per model.
        k: neighbours per query (the pseudo-labels of MLS: 20).
        seed: seed of pretraining and of the query and bank crops.
    """
    labels = SyntheticScenes(2000, 64, seed).multi_hot().bool()
    pairs = (labels[:, None, :] & labels[None, :, :]).any(-1).float()
    chance = float((pairs.sum() - len(labels)) / (len(labels) * (len(labels) - 1)))
    results = {}
    for i, (name, overrides) in enumerate(VARIANTS.items()):
        run = Path(out) / f"variant{i}"
        ckpt = pretrain(out=str(run), seed=seed, **overrides)
        found = neighbors(checkpoint=str(ckpt), out=str(run / "neighbors.png"), queries=queries, k=k,
                          bank="dataset", seed=seed, tile=32)
        results[name] = neighbor_precision(found)
    print(f"\nneighbour precision, {queries} queries x top-{k} among 2,000 scenes (chance {chance:.3f}):")
    print("| pretraining | precision | vs random init |\n|---|---|---|")
    base = results["random init (lr 0)"]
    for name, value in results.items():
        print(f"| {name} | {value:.3f} | {value / base:.2f}x |")


if __name__ == "__main__":
    CLI(benchmark)
