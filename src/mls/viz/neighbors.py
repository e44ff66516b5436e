"""Nearest-neighbour figures (supplement B.3, Fig. 5-6): a query crop and its top-k entries of ``Q_g``.

Each row shows the query image with its crop in red, then its k neighbours, each drawn as
its source image with the crop that produced the entry in yellow. The search (the paper's label
selection: cosine similarity of ``ĝ1`` to ``Q_g``), what it reads from the checkpoint and the neighbour
precision live in ``mls.neighbor_search``; this module draws what it found and holds the command.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from PIL import Image, ImageDraw, ImageFont

from mls.files import atomic_write, ensure_writable
from mls.neighbor_search import Query, dataset_bank, neighbor_precision, open_pretrained, search

RED, YELLOW = (255, 0, 0), (255, 255, 0)
MATCH, MISS = (0, 170, 0), (150, 0, 150)
BACKGROUND, LETTERBOX = (255, 255, 255), (128, 128, 128)


@dataclass
class Layout:
    """Pixel geometry of the figure: square tiles of ``tile`` px, ``gap`` px apart, a caption band under each row.

    Tile (row r, column c) starts at ``x = gap + c·(tile + gap)``, ``y = gap + r·(tile + gap + caption)``.
    """

    tile: int = 128
    gap: int = 8
    caption: int = 16
    line: int = 2  # width of the crop rectangles
    frame: int = 3  # width of the match / miss frames, drawn in the gap around a tile

    def origin(self, row: int, col: int) -> tuple[int, int]:
        return self.gap + col * (self.tile + self.gap), self.gap + row * (self.tile + self.gap + self.caption)

    def size(self, rows: int, cols: int) -> tuple[int, int]:
        return self.gap + cols * (self.tile + self.gap), self.gap + rows * (self.tile + self.gap + self.caption)


def box_pixels(box, origin: tuple[int, int], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Inclusive pixel rectangle of a normalised box in an image of ``size`` placed at ``origin``."""
    (ox, oy), (w, h) = origin, size
    x0, y0 = ox + round(box[0] * w), oy + round(box[1] * h)
    return x0, y0, max(x0, ox + round(box[2] * w) - 1), max(y0, oy + round(box[3] * h) - 1)


def draw_tile(canvas: Image.Image, image: Image.Image, box, color, origin: tuple[int, int], layout: Layout) -> None:
    """Paste ``image`` fitted (aspect kept, centred) into a square tile and outline ``box`` on it (none: no outline)."""
    scale = layout.tile / max(image.size)
    w, h = max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale))
    x, y = origin[0] + (layout.tile - w) // 2, origin[1] + (layout.tile - h) // 2
    canvas.paste(Image.new("RGB", (layout.tile, layout.tile), LETTERBOX), origin)
    canvas.paste(image.convert("RGB").resize((w, h), Image.Resampling.BILINEAR), (x, y))
    if box is not None:
        ImageDraw.Draw(canvas).rectangle(box_pixels(box, (x, y), (w, h)), outline=color, width=layout.line)


@dataclass
class Tile:
    """One panel of a neighbour figure: an image, the crop outlined on it (``None``: none), a caption under it,
    and whether it shares a class with its row's query (a green or purple frame; ``None``: no frame)."""

    image: Image.Image
    caption: str
    box: tuple[float, float, float, float] | None = None
    color: tuple[int, int, int] = YELLOW
    match: bool | None = None


def render_rows(rows: list[list[Tile]], layout: Layout = Layout()) -> Image.Image:
    """The tiles, one row of the figure per list: a query then its neighbours (``mls search`` draws these too)."""
    canvas = Image.new("RGB", layout.size(len(rows), max(len(row) for row in rows)), BACKGROUND)
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            x, y = layout.origin(r, c)
            draw_tile(canvas, tile.image, tile.box, tile.color, (x, y), layout)
            draw.text((x, y + layout.tile + layout.frame + 1), tile.caption, fill=(0, 0, 0), font=font)
            if tile.match is not None:
                f = layout.frame
                draw.rectangle((x - f, y - f, x + layout.tile - 1 + f, y + layout.tile - 1 + f),
                               outline=MATCH if tile.match else MISS, width=f)
    return canvas


def render(queries: list[Query], source, layout: Layout = Layout()) -> Image.Image:
    """One row per query: the query with its crop (red), then its neighbours with theirs (yellow)."""
    rows = [[Tile(source.image(q.index), f"query #{q.index}", q.box, RED)]
            + [Tile(source.image(n.index), f"#{n.index}  s={n.similarity:.2f}", n.box, YELLOW, n.match)
               for n in q.neighbors] for q in queries]
    return render_rows(rows, layout)


def neighbors(checkpoint: str | None = None, out: str = "neighbors.png", data: str | None = None,
              annotations: str | None = None, queries: int = 6, k: int = 10, seed: int = 0,
              query_index: list[int] | None = None, bank: Literal["queue", "dataset"] = "queue",
              bank_images: int | None = None, include_query_image: bool = False, image_size: int | None = None,
              tile: int = 128, force: bool = False) -> list[Query]:
    """Draw query crops (red) and their top-k neighbours in Q_g (yellow crops), one row per query.

    Args:
        checkpoint: Pretraining checkpoint (``.ckpt``) written by ``mls pretrain`` (required).
        out: Output image (``.png`` or ``.jpg``).
        data: Image folder or COCO root the checkpoint was trained on; default: the checkpoint's own data.
        annotations: COCO annotation file for ``data`` (labels mark neighbours that share a class).
        queries: Number of query images drawn at random (ignored when ``query_index`` is given).
        k: Neighbours shown per query (the paper's figures show 10).
        seed: Seed of the query images and of their random crops.
        query_index: Data-set indices of the query images, e.g. ``'[3,17]'``.
        bank: ``queue`` searches the checkpoint's Q_g; ``dataset`` embeds one fresh random crop per image.
        bank_images: With ``--bank dataset``, embed only the first this many images.
        include_query_image: Also show entries cropped from the query image itself (they match trivially).
        image_size: Crop size fed to the backbone; default: the pretraining image size.
        tile: Size in pixels of each square panel of the figure.
        force: Draw even when the data is not the data set the checkpoint was pretrained on.
    """
    if checkpoint is None:
        raise ValueError("--checkpoint is required: the pretraining checkpoint whose queue is searched")
    if queries < 1 or k < 1 or tile < 16:
        raise ValueError(f"--queries and --k must be >= 1 and --tile >= 16, got {queries}, {k}, {tile}")
    if bank not in ("queue", "dataset"):
        raise ValueError(f"--bank must be 'queue' or 'dataset', got {bank!r}")
    ensure_writable(out)
    if Path(out).suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"--out {out!r} needs an image extension such as .png or .jpg")
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint!r} does not exist")
    opened = open_pretrained(checkpoint, data, annotations, query_index, image_size,
                             "use --bank dataset" if bank == "queue" else None, force)
    model, source, stored, crop_size = opened.model, opened.source, opened.bank, opened.image_size

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        picked = list(query_index) if query_index else torch.randperm(len(source))[:queries].tolist()
        if stored is None:
            n = len(source) if bank_images is None else min(bank_images, len(source))
            stored = dataset_bank(model.backbone_q, source, crop_size, list(range(n)))
        found = search(model.backbone_q, source, stored, picked, k, crop_size, include_query_image)
    figure = render(found, source, Layout(tile=tile))
    atomic_write(out, lambda tmp: figure.save(tmp, format=Image.registered_extensions()[Path(out).suffix.lower()]))
    share = neighbor_precision(found)
    print(f"wrote {len(found)} queries x {len(found[0].neighbors)} neighbours "
          f"from {bank} ({len(stored.index)} entries) to {out}")
    if share is not None:
        print(f"neighbour precision (shares a class with the query): {share:.3f}")
    return found
