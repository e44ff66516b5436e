"""``mls search``'s work: the nearest embedded images of query images, or of every embedded image, written as a
table (query, rank, neighbour, cosine) and drawn as a contact sheet (``mls.viz.neighbors``' layout).

Query images are embedded with the settings ``mls embed`` recorded (same weights, features, crop, precision),
so that they land in the space they are searched in.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from mls.data.images import UnreadableImage, load_rgb
from mls.data.sources import open_source
from mls.embedding.encoder import Encoder, file_digest
from mls.embedding.knn import exact_search, pick_engine
from mls.embedding.settings import EmbedSettings, SearchSettings
from mls.embedding.store import Embeddings, open_embeddings, write_table
from mls.files import atomic_write, ensure_writable_folder
from mls.viz.neighbors import RED, Layout, Tile, render_rows

TABLE, SHEET = "neighbors.csv", "neighbors.png"


@dataclass
class Found:
    """One query and its neighbours, nearest first: rows of the embeddings and their cosines."""

    name: str
    image: object  # a function returning the query's image, for the sheet
    rows: list[int]
    cosines: list[float]


def _queries(n: int) -> str:
    """``1 query``, ``2,000 queries``."""
    return f"{n:,} {'query' if n == 1 else 'queries'}"


def recorded_settings(record: dict) -> EmbedSettings:
    """The settings an ``mls embed`` output was made with; weights changed since then are refused."""
    settings = EmbedSettings(**{f.name: record[f.name] for f in dataclasses.fields(EmbedSettings)})
    if settings.weights != "random":
        if not Path(settings.weights).is_file():
            raise FileNotFoundError(f"the weights the embeddings were made with, {settings.weights}, are gone")
        if file_digest(settings.weights) != record.get("weights_sha256"):
            raise ValueError(f"{settings.weights} changed since the embeddings were made: queries would land in "
                             "another space; run mls embed again")
    return settings


def read_query(path: str) -> Image.Image:
    """A query image as RGB; a missing or unreadable file in one line."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"query image {path!r} does not exist")
    try:
        return load_rgb(path)
    except UnreadableImage as error:
        raise ValueError(f"query image {path} cannot be read: {error.reason}") from None


def embed_queries(paths: list[str], record: dict) -> torch.Tensor:
    """The query images embedded as ``mls embed`` embedded the collection."""
    images = [read_query(p) for p in paths]
    encoder = Encoder(recorded_settings(record), torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    return encoder(torch.stack([encoder.transform(image) for image in images]))


def find(options: SearchSettings, stored: Embeddings, engine: str) -> list[Found]:
    """Each query's neighbours, those below ``--min-cosine`` dropped (with ``--all``, queries left without any too)."""
    if options.all:
        queries, exclude = stored.vectors, torch.arange(len(stored.vectors))
        names = stored.paths
    else:
        queries, exclude, names = embed_queries(options.query_files, stored.record), None, options.query_files
    if len(stored.vectors) - (exclude is not None) < 1:
        raise ValueError(f"{options.embeddings} holds too few embeddings to search ({len(stored.vectors)})")
    cosines, rows = exact_search(queries, stored.vectors, options.k, engine, exclude)
    found = []
    for q, (name, cos, row) in enumerate(zip(names, cosines.tolist(), rows.tolist())):
        keep = [i for i, c in enumerate(cos) if options.min_cosine is None or c >= options.min_cosine]
        if keep or not options.all:
            image = (lambda p=name: read_query(p)) if not options.all else q
            found.append(Found(name, image, [row[i] for i in keep], [cos[i] for i in keep]))
    return found


def contact_sheet(found: list[Found], stored: Embeddings, rows: int, tile: int, all_images: bool) -> Image.Image:
    """The first ``rows`` queries (with ``--all``: those whose nearest neighbour is closest) and their neighbours."""
    if all_images:
        found = sorted(found, key=lambda f: -f.cosines[0])
    source = open_source(stored.record["data"])

    def image(row: int) -> Image.Image:
        return source.image(stored.index[row])

    whole = (0.0, 0.0, 1.0, 1.0)  # the query outlined in red, as a query crop is in `mls visualize neighbors`
    sheet = [[Tile(f.image() if callable(f.image) else image(f.image), f"query {short(f.name)}", whole, RED)]
             + [Tile(image(r), f"{short(stored.paths[r])} {c:.3f}") for r, c in zip(f.rows, f.cosines)]
             for f in found[:rows]]
    return render_rows(sheet, Layout(tile=tile))


def short(name: str, width: int = 14) -> str:
    """A file name cut to fit under a tile: its last ``width`` characters."""
    name = Path(name).name
    return name if len(name) <= width else "…" + name[-(width - 1):]


def search_embeddings(options: SearchSettings) -> dict:
    """``mls search``: find, write the table and the sheet, print where they are."""
    stored = open_embeddings(options.embeddings)
    out = ensure_writable_folder(options.out)
    engine = pick_engine(options.engine)
    start = time.perf_counter()
    found = find(options, stored, engine)
    seconds = time.perf_counter() - start
    rows = [(f.name, rank, stored.paths[r], f"{c:.6f}") for f in found
            for rank, (r, c) in enumerate(zip(f.rows, f.cosines), start=1)]
    write_table(out / TABLE, ("query", "rank", "neighbor", "cosine"), rows)
    print(f"mls search: {_queries(len(found))}, {len(rows):,} neighbours among {len(stored.vectors):,} embeddings "
          f"({engine}, {seconds:.2f} s) in {out / TABLE}")
    drawn = [f for f in found if f.rows][:options.sheet_rows] if options.all else found[:options.sheet_rows]
    if options.sheet_rows and drawn:
        figure = contact_sheet(drawn if not options.all else [f for f in found if f.rows], stored,
                               options.sheet_rows, options.tile, options.all)
        atomic_write(out / SHEET, lambda tmp: figure.save(tmp, format="PNG"))
        print(f"contact sheet of {_queries(min(len(drawn), options.sheet_rows))}: {out / SHEET}")
    return {"queries": len(found), "neighbors": len(rows), "engine": engine, "table": str(out / TABLE)}
