"""How often the top-5 neighbours found by `mls embed` + `mls search --all true` share a class with their query:
a pretrained backbone against a random network of the same shape, on built-in scenes it was not trained on.

Writes labelled built-in scenes (`mls synth`'s COCO layout, seed 1: not the demo's training images), embeds them
with each backbone (`mls embed`), searches every image's 5 nearest others (`mls search --all true`), and counts
the neighbours that share at least one class with their query. Draws the pretrained backbone's first queries
and their neighbours (green frame: shares a class; purple: does not) into --figure.

    OMP_NUM_THREADS=1 python benchmarks/embed_neighbors.py --weights runs/demo/checkpoints/last.ckpt \\
        --figure docs/img/embed_neighbors_demo.png
"""
from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path

from mls.checkpoints.pretrained import backbone_info
from mls.data.images import load_rgb, read_coco_labels
from mls.data.synthetic import write_coco
from mls.embedding.commands import embed, search_images
from mls.viz.neighbors import RED, Layout, Tile, render_rows

K = 5


def neighbor_share(weights: str, arch: str, small_stem: bool, folder: Path, labels: dict, out: Path) -> list[list]:
    """Embed ``folder`` with ``weights``, search every image's K neighbours; the table's rows with a match flag."""
    embed(data=str(folder), out=str(out / "embed"), weights=weights, arch=arch, small_stem=small_stem, workers=0)
    search_images(embeddings=str(out / "embed"), all=True, k=K, out=str(out / "search"), sheet_rows=0,
                  engine="torch")
    with open(out / "search" / "neighbors.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return [[r["query"], r["neighbor"], float(r["cosine"]), bool(set(labels[r["query"]]) & set(labels[r["neighbor"]]))]
            for r in rows]


def figure(rows: list[list], folder: Path, queries: int, path: str) -> None:
    """The first ``queries`` queries and their neighbours, matches framed green, misses purple."""
    by_query: dict[str, list] = {}
    for query, neighbor, cosine, match in rows:
        by_query.setdefault(query, []).append((neighbor, cosine, match))
    tiles = [[Tile(load_rgb(folder / q), f"query {q[-8:]}", (0.0, 0.0, 1.0, 1.0), RED)]
             + [Tile(load_rgb(folder / n), f"{n[-8:]} {c:.2f}", None, match=m) for n, c, m in found]
             for q, found in list(by_query.items())[:queries]]
    render_rows(tiles, Layout(tile=96)).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, help="the pretrained backbone (e.g. the demo's last.ckpt)")
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--figure", default=None, help="PNG of the pretrained backbone's first queries")
    parser.add_argument("--queries", type=int, default=5)
    args = parser.parse_args()
    info = backbone_info(args.weights)
    with tempfile.TemporaryDirectory() as tmp:
        annotations = write_coco(Path(tmp) / "scenes", args.images, 64, seed=1, splits=("val2017",))["val2017"]
        files, labels, _ = read_coco_labels(str(annotations))
        folder, labels = Path(tmp) / "scenes" / "val2017", dict(zip(files, labels))
        shares = {}
        for name, weights in (("pretrained", args.weights), ("random", "random")):
            rows = neighbor_share(weights, info["arch"], info["small_stem"], folder, labels, Path(tmp) / name)
            shares[name] = (sum(r[3] for r in rows), len(rows))
            if name == "pretrained" and args.figure:
                figure(rows, folder, args.queries, args.figure)
    print(f"{args.images} built-in scenes (seed 1, 64 px), {info['arch']}, top-{K} neighbours of every image:")
    for name, (shared, total) in shares.items():
        print(f"  {name:>10}: {shared:,} of {total:,} neighbours share a class with their query ({shared / total:.3f})")


if __name__ == "__main__":
    main()
