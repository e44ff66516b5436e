"""How often the top-5 neighbours found by `mls embed` + `mls search --all true` share a class with their query:
pretrained backbones against random networks of the same shape, on built-in scenes they were not trained on.

Two measures (docs/study/PREDICTIONS.md, entry 4): (a) the share of neighbours sharing at least one class with their
query; (b) the class-averaged precision at 5: per class, over the queries holding it, the mean share of their
neighbours holding it, then the mean over classes. With several --weights (one per pretraining seed), each is
paired with a random network initialised with the same seed (--seeds), and the paired differences are reported.

Writes labelled built-in scenes (`mls synth`'s COCO layout, seed 1: not the demo's training images), embeds them
with each backbone (`mls embed`), searches every image's 5 nearest others (`mls search --all true`), and counts
the neighbours that share at least one class with their query. Draws the pretrained backbone's first queries
and their neighbours (green frame: shares a class; purple: does not) into --figure.

    OMP_NUM_THREADS=1 python benchmarks/embed_neighbors.py --weights runs/demo/checkpoints/last.ckpt \\
        --figure docs/img/embed_neighbors_demo.png
    python benchmarks/embed_neighbors.py --weights runs/s0/export/backbone.safetensors runs/s1/... --seeds 0 1 2
    python benchmarks/embed_neighbors.py --weights runs/photos/checkpoints/last.ckpt \
        --coco photos/heldout/coco/annotations/instances_train2017.json   # labelled images of your own

Every network embeds the same centre crops, at the first weights' pretraining size (or --image-size).
"""
from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
from pathlib import Path

import torch

from mls.checkpoints.pretrained import backbone_info
from mls.data.images import load_rgb, read_coco_labels
from mls.data.synthetic import write_coco
from mls.embedding.commands import embed, search_images
from mls.method.backbones import build_backbone
from mls.viz.neighbors import RED, Layout, Tile, render_rows

K = 5


def neighbor_share(weights: str, info: dict, folder: Path, labels: dict, out: Path) -> list[list]:
    """Embed ``folder`` with ``weights`` (the network and crop size of ``info``), search every image's K
    neighbours; the table's rows with a match flag."""
    embed(data=str(folder), out=str(out / "embed"), weights=weights, arch=info["arch"], small_stem=info["small_stem"],
          image_size=info["image_size"], workers=0)
    search_images(embeddings=str(out / "embed"), all=True, k=K, out=str(out / "search"), sheet_rows=0,
                  engine="torch")
    with open(out / "search" / "neighbors.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return [[r["query"], r["neighbor"], float(r["cosine"]), bool(set(labels[r["query"]]) & set(labels[r["neighbor"]]))]
            for r in rows]


def class_averaged_precision(rows: list[list], labels: dict) -> float:
    """Per class, over the queries holding it, the mean share of their neighbours holding it; the mean over classes."""
    found: dict[str, list[str]] = {}
    for query, neighbor, _, _ in rows:
        found.setdefault(query, []).append(neighbor)
    per_class: dict[int, list[float]] = {}
    for query, neighbors in found.items():
        for c in set(labels[query]):
            per_class.setdefault(c, []).append(sum(c in labels[n] for n in neighbors) / len(neighbors))
    return statistics.mean(statistics.mean(shares) for shares in per_class.values())


def chance(labels: dict) -> float:
    """The share of ordered pairs of different images that share at least one class."""
    names = sorted(labels)
    classes = sorted({c for found in labels.values() for c in found})
    held = torch.zeros(len(names), len(classes))
    for row, name in enumerate(names):
        held[row, [classes.index(c) for c in labels[name]]] = 1
    shared = (held @ held.T > 0).float()
    return ((shared.sum() - shared.diagonal().sum()) / (len(names) * (len(names) - 1))).item()


def random_weights(arch: str, small_stem: bool, seed: int, path: Path) -> str:
    """A randomly initialised backbone (``seed``), saved as torchvision weights ``mls embed`` reads."""
    torch.manual_seed(seed)
    backbone, _ = build_backbone(arch, small_stem)
    torch.save({k: v for k, v in backbone.state_dict().items() if not k.startswith("fc.")}, path)
    return str(path)


def paired(values: list[float]) -> str:
    """mean ± std of paired differences, its standard error and the registered verdict (beyond 2 SE)."""
    if len(values) < 2:
        return f"{values[0]:+.3f}"
    mean, std = statistics.mean(values), statistics.stdev(values)
    se = std / len(values) ** 0.5
    verdict = "better" if mean > 2 * se else "worse" if mean < -2 * se else "level"
    return f"{mean:+.3f} ± {std:.3f} (SE {se:.3f}): {verdict}"


def figure(rows: list[list], folder: Path, queries: int, path: str) -> None:
    """The first ``queries`` queries and their neighbours, matches framed green, misses purple."""
    by_query: dict[str, list] = {}
    for query, neighbor, cosine, match in rows:
        by_query.setdefault(query, []).append((neighbor, cosine, match))
    tiles = [[Tile(load_rgb(folder / q), f"query {q[-8:]}", (0.0, 0.0, 1.0, 1.0), RED)]
             + [Tile(load_rgb(folder / n), f"{n[-8:]} {c:.2f}", None, match=m) for n, c, m in found]
             for q, found in list(by_query.items())[:queries]]
    render_rows(tiles, Layout(tile=96)).convert("RGB").save(path)  # PNG or JPEG


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", nargs="+", required=True, help="pretrained backbones, one per pretraining seed")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="their seeds, for the random networks "
                        "(default: 0, 1, ...)")
    parser.add_argument("--images", type=int, default=500, help="built-in scenes to write (without --coco)")
    parser.add_argument("--coco", default=None, help="labelled images instead of built-in scenes: a COCO "
                        "ROOT/annotations/instances_SPLIT.json, its images in ROOT/SPLIT")
    parser.add_argument("--figure", default=None, help="PNG of the first pretrained backbone's first queries")
    parser.add_argument("--queries", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=None, help="crop size for every network (default: the "
                        "first weights' pretraining size)")
    args = parser.parse_args()
    seeds = args.seeds or list(range(len(args.weights)))
    info = backbone_info(args.weights[0])
    # Both networks see the same crops: the pretraining size (a random network's weights record none, and would
    # otherwise be embedded at mls embed's default of 224 px).
    info["image_size"] = args.image_size or info["image_size"]
    if not info["image_size"]:
        parser.error(f"{args.weights[0]} records no pretraining image size: give --image-size")
    measures: dict[str, dict[int, tuple]] = {"pretrained": {}, "random": {}}
    with tempfile.TemporaryDirectory() as tmp:
        if args.coco:
            annotations = Path(args.coco)
            folder, described = annotations.parent.parent / annotations.stem.removeprefix("instances_"), args.coco
        else:
            annotations = write_coco(Path(tmp) / "scenes", args.images, 64, seed=1, splits=("val2017",))["val2017"]
            folder, described = Path(tmp) / "scenes" / "val2017", "built-in scenes (seed 1, 64 px)"
        files, labels, _ = read_coco_labels(str(annotations))
        labels = dict(zip(files, labels))
        for seed, weights in zip(seeds, args.weights):
            randomly = random_weights(info["arch"], info["small_stem"], seed, Path(tmp) / f"random{seed}.pth")
            for name, source in (("pretrained", weights), ("random", randomly)):
                rows = neighbor_share(source, info, folder, labels, Path(tmp) / f"{name}{seed}")
                measures[name][seed] = (sum(r[3] for r in rows), len(rows), class_averaged_precision(rows, labels))
                if name == "pretrained" and args.figure and seed == seeds[0]:
                    figure(rows, folder, args.queries, args.figure)
    print(f"{len(labels):,} images of {described}, {info['arch']} on {info['image_size']} px centre crops, "
          f"top-{K} neighbours of every image; chance for (a), any two different images: {chance(labels):.3f}")
    for seed in seeds:
        for name in measures:
            shared, total, precision = measures[name][seed]
            print(f"  seed {seed} {name:>10}: (a) {shared:,} of {total:,} neighbours share a class with their query "
                  f"({shared / total:.3f}); (b) class-averaged precision at {K} {precision:.3f}")
    for index, label in ((0, "(a) share of neighbours with a class in common"), (2, "(b) class-averaged precision")):
        def value(name, seed, i=index):
            m = measures[name][seed]
            return m[0] / m[1] if i == 0 else m[2]
        print(f"  paired Δ (pretrained − random), {label}: "
              + paired([value("pretrained", s) - value("random", s) for s in seeds]))


if __name__ == "__main__":
    main()
