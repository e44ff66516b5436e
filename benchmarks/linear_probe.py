"""Linear probe of MLS, MoCo-v2 and random-init features on the synthetic multi-label task.

Pretrains the default CPU demo twice at the same budget (method mls, method mocov2), then runs
``mls eval linear`` on the synthetic task for both checkpoints and for a randomly initialised
backbone of the same architecture, and prints one table of mAP. The default budget (the demo's
8 epochs over 2,000 scenes) takes about 13 minutes on 2 CPU cores; lower ``--epochs`` or
``--max_steps`` to try it quickly.

    python benchmarks/linear_probe.py --epochs 8 --out runs/bench-linear
"""
from __future__ import annotations

from pathlib import Path

from jsonargparse import CLI

from mls.eval.commands import linear
from mls.eval.results import markdown_table
from mls.train import pretrain


def benchmark(out: str = "runs/bench-linear", epochs: int = 8, max_steps: int = -1, num_images: int = 2000,
              queue_size: int = 1024, image_size: int = 64, hue: float = 0.0, grayscale_p: float = 0.0,
              probe_epochs: int = 100, probe_images: int = 1000, runs: int = 2, workers: int = 2, seed: int = 0) -> str:
    """Pretrain with MLS and MoCo-v2 at one budget, linear-probe both and random init; return the table.

    Args:
        out: folder for the checkpoints, each evaluation's results and the combined results.md.
        epochs: pretraining epochs of each method (the budget).
        max_steps: stop pretraining after this many steps (-1: all epochs).
        num_images: synthetic scenes used for pretraining.
        queue_size: dictionary size D of both methods; must stay below num_images.
        image_size: pretraining and evaluation resolution.
        hue: hue shift of the pretraining views (the demo: 0; MoCo-v2: 0.1).
        grayscale_p: probability of a grayscale pretraining view (the demo: 0; MoCo-v2: 0.2).
        probe_epochs: epochs of the linear layer.
        probe_images: synthetic training images of the probe (test: half as many, from another seed).
        runs: probe repetitions averaged per backbone.
        workers: data-loading processes.
        seed: seed of pretraining and of the first probe run.
    """
    root = Path(out)
    weights = {method: str(pretrain(out=str(root / method), method=method, epochs=epochs, max_steps=max_steps,
                                    num_images=num_images, queue_size=queue_size, image_size=image_size,
                                    hue=hue, grayscale_p=grayscale_p, workers=workers, seed=seed))
               for method in ("mls", "mocov2")}
    probe = {"epochs": probe_epochs, "synthetic_images": probe_images, "runs": runs, "workers": workers, "seed": seed}
    results = [linear(weights=w, out=str(root / f"eval-{m}"), **probe) for m, w in weights.items()]
    arch, small_stem = results[0]["arch"], results[0]["small_stem"]
    results.append(linear(weights="random", arch=arch, small_stem=small_stem, image_size=image_size,
                          out=str(root / "eval-random"), **probe))
    names = ("MLS", "MoCo-v2", "random init")
    for result, name in zip(results, names):
        result["weights"] = f"{name}: {result['weights']}"
    table = markdown_table(results) + "\n" + per_class_table(results, names)
    (root / "results.md").write_text(table)
    print(f"\nLinear probe on the synthetic multi-label task, pretraining budget: {epochs} epochs"
          f"{f', at most {max_steps} steps' if max_steps > 0 else ''}\n\n{table}")
    return table


def per_class_table(results: list[dict], names: tuple[str, ...]) -> str:
    """AP of each class (rows) for each backbone (columns): which classes pretraining helped or hurt."""
    lines = ["| class | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for cls in results[0]["per_class_ap"]:
        lines.append(f"| {cls} | " + " | ".join(f"{r['per_class_ap'][cls]:.1f}" for r in results) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    CLI(benchmark)
