"""Nearest-neighbour figures (supplement B.3, Fig. 5-6): a query crop and its top-k entries of ``Q_g``.

Each row shows the query image with its crop in red, then its k neighbours, each drawn as
its source image with the crop that produced the entry in yellow. The search is the
paper's label selection itself (``mls.selection``): cosine similarity of ``ĝ1`` to ``Q_g``.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as TF

from mls.data.augment import MoCoV2View
from mls.data.sources import open_source
from mls.files import atomic_write, ensure_writable
from mls.selection import cosine_similarity, topk_indices

DATA_KEYS = ("data", "annotations", "num_images", "image_size", "seed")  # the arguments of open_source
RED, YELLOW = (255, 0, 0), (255, 255, 0)
MATCH, MISS = (0, 170, 0), (150, 0, 150)
BACKGROUND, LETTERBOX = (255, 255, 255), (128, 128, 128)


@dataclass
class Bank:
    """Features searched for neighbours, with where each came from: the valid part of the queue, or fresh crops."""

    g: Tensor  # (N, dg) L2-normalised backbone features
    index: Tensor  # (N,) dataset index of the source image
    box: Tensor  # (N, 4) normalised crop box (x0, y0, x1, y1)


@dataclass
class Neighbor:
    """One entry of the bank shown beside a query."""

    index: int
    box: tuple[float, float, float, float]
    similarity: float
    match: bool | None = None  # shares a class with the query, when labels are known


@dataclass
class Query:
    """A query crop: its image, box, feature ``ĝ1`` and its neighbours, nearest first."""

    index: int
    box: tuple[float, float, float, float]
    g: Tensor
    neighbors: list[Neighbor] = field(default_factory=list)


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


def queue_bank(queue: nn.Module) -> Bank:
    """The valid entries of ``Q_g`` that know their source image; fails clearly when there are none."""
    missing = [name for name in ("g", "index", "box") if name not in queue]
    if missing:
        raise ValueError(f"the checkpoint's queue has no {', '.join(missing)} field; neighbour figures need "
                         "Q_g with the index and crop box of each entry; use --bank dataset")
    keep = queue.valid & (queue["index"] >= 0)
    if not bool(keep.any()):
        raise ValueError("the checkpoint's queue holds no entries with a known source image (index and box); "
                         "it was saved before any batch carried them, or before the queue was written: "
                         "use --bank dataset")
    return Bank(F.normalize(queue["g"][keep].float(), dim=1), queue["index"][keep].long(), queue["box"][keep].float())


def crop_view(image_size: int) -> MoCoV2View:
    """The geometry of MoCo-v2's view only: a random-resized crop, without flip, colour or blur."""
    return MoCoV2View(image_size, flip_p=0, jitter_p=0, grayscale_p=0, blur_p=0)


def crop_at(image: Image.Image, box, image_size: int) -> Tensor:
    """``image`` cropped at the normalised ``box`` and resized to ``image_size``, normalised as a view is.

    The crop's edges are ``round(x0·w) .. round(x1·w)``: the pixels the box was drawn from, since a
    view's box is its integer crop divided by the image size. No flip, colour change or blur.
    """
    w, h = image.size
    left, top = round(float(box[0]) * w), round(float(box[1]) * h)
    width, height = max(1, round(float(box[2]) * w) - left), max(1, round(float(box[3]) * h) - top)
    crop = TF.resized_crop(image, top, left, height, width, [image_size, image_size], antialias=True)
    return crop_view(image_size).appearance(crop).as_subclass(Tensor)


@torch.no_grad()
def encode_batches(encode, crops: Iterable[Tensor], batch_size: int = 64) -> tuple[Tensor, ...]:
    """``encode`` (returning a tensor or a tuple of tensors) on ``crops`` stacked ``batch_size`` at a time.

    ``crops`` may be a generator, so that no more than one batch of images is held at once.
    Returns each output concatenated over the batches, as a tuple.
    """
    outputs, batch = [], []
    for crop in crops:
        batch.append(crop)
        if len(batch) == batch_size:
            outputs.append(encode(torch.stack(batch)))
            batch = []
    if batch:
        outputs.append(encode(torch.stack(batch)))
    outputs = [out if isinstance(out, tuple) else (out,) for out in outputs]
    return tuple(torch.cat(parts) for parts in zip(*outputs))


def embed_boxes(encode, source, indices, boxes, image_size: int, batch_size: int = 64) -> tuple[Tensor, ...]:
    """Each listed image cropped at its box (``crop_at``) and passed through ``encode`` in batches."""
    crops = (crop_at(source.image(int(i)), box, image_size) for i, box in zip(indices, boxes))
    return encode_batches(encode, crops, batch_size)


@torch.no_grad()
def embed_random_crops(backbone: nn.Module, source, indices: list[int], image_size: int,
                       batch_size: int = 64) -> tuple[Tensor, Tensor]:
    """One random crop per listed image: its L2-normalised pooled feature ``ĝ`` (N x dg) and its box (N x 4).

    Uses the global torch generator, as training does; callers seed it.
    """
    backbone.eval()
    view, boxes = crop_view(image_size), []

    def crops():
        for i in indices:
            v = view(source.image(i))
            boxes.append(v.box)
            yield v.image

    g, = encode_batches(lambda x: F.normalize(backbone(x).flatten(1).float(), dim=1), crops(), batch_size)
    return g, torch.stack(boxes)


def dataset_bank(backbone: nn.Module, source, image_size: int, indices: list[int]) -> Bank:
    """A bank of one fresh random crop per data-set image, for checkpoints whose queue lacks the wanted images."""
    g, boxes = embed_random_crops(backbone, source, indices, image_size)
    return Bank(g, torch.tensor(indices, dtype=torch.long), boxes)


def nearest(g: Tensor, bank: Bank, k: int, exclude: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Similarities and bank rows (N x k) of each query's top-k cosine neighbours (the label selection).

    ``exclude`` (N,) gives per query an image whose entries are skipped: its own, which matches trivially.
    """
    sim = cosine_similarity(g, bank.g)
    if exclude is not None:
        allowed = bank.index[None, :] != exclude[:, None]
        sim = sim.masked_fill(~allowed, float("-inf"))
        k = min(k, int(allowed.sum(1).min()))
    rows = topk_indices(sim, k)
    return sim.gather(1, rows), rows


def shares_class(a: list[int] | None, b: list[int] | None) -> bool | None:
    """Whether two images share a class; ``None`` when either has no labels."""
    if a is None or b is None:
        return None
    return bool(set(a) & set(b))


def search(backbone: nn.Module, source, bank: Bank, query_indices: list[int], k: int, image_size: int,
           include_query_image: bool = False) -> list[Query]:
    """Crop each query image at random, embed the crop and find its k neighbours in ``bank``."""
    g, boxes = embed_random_crops(backbone, source, query_indices, image_size)
    exclude = None if include_query_image else torch.tensor(query_indices, dtype=torch.long)
    sims, rows = nearest(g, bank, k, exclude)
    if rows.shape[1] == 0:
        raise ValueError("the bank holds no entries besides the query images; use --include-query-image "
                         "or --bank dataset")
    queries = []
    for qi, box, gq, sim, row in zip(query_indices, boxes.tolist(), g, sims, rows):
        labels = source.labels(qi)
        neighbors = [Neighbor(int(bank.index[r]), tuple(bank.box[r].tolist()), float(s),
                              shares_class(labels, source.labels(int(bank.index[r]))))
                     for s, r in zip(sim.tolist(), row.tolist())]
        queries.append(Query(qi, tuple(box), gq, neighbors))
    return queries


def box_pixels(box, origin: tuple[int, int], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Inclusive pixel rectangle of a normalised box in an image of ``size`` placed at ``origin``."""
    (ox, oy), (w, h) = origin, size
    x0, y0 = ox + round(box[0] * w), oy + round(box[1] * h)
    return x0, y0, max(x0, ox + round(box[2] * w) - 1), max(y0, oy + round(box[3] * h) - 1)


def draw_tile(canvas: Image.Image, image: Image.Image, box, color, origin: tuple[int, int], layout: Layout) -> None:
    """Paste ``image`` fitted (aspect kept, centred) into a square tile and outline ``box`` on it."""
    scale = layout.tile / max(image.size)
    w, h = max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale))
    x, y = origin[0] + (layout.tile - w) // 2, origin[1] + (layout.tile - h) // 2
    canvas.paste(Image.new("RGB", (layout.tile, layout.tile), LETTERBOX), origin)
    canvas.paste(image.convert("RGB").resize((w, h), Image.Resampling.BILINEAR), (x, y))
    ImageDraw.Draw(canvas).rectangle(box_pixels(box, (x, y), (w, h)), outline=color, width=layout.line)


def render(queries: list[Query], source, layout: Layout = Layout()) -> Image.Image:
    """One row per query: the query with its crop (red), then its neighbours with theirs (yellow)."""
    cols = 1 + max(len(q.neighbors) for q in queries)
    canvas = Image.new("RGB", layout.size(len(queries), cols), BACKGROUND)
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for r, q in enumerate(queries):
        x, y = layout.origin(r, 0)
        draw_tile(canvas, source.image(q.index), q.box, RED, (x, y), layout)
        draw.text((x, y + layout.tile + layout.frame + 1), f"query #{q.index}", fill=(0, 0, 0), font=font)
        for c, n in enumerate(q.neighbors, start=1):
            x, y = layout.origin(r, c)
            draw_tile(canvas, source.image(n.index), n.box, YELLOW, (x, y), layout)
            caption = f"#{n.index}  s={n.similarity:.2f}"
            draw.text((x, y + layout.tile + layout.frame + 1), caption, fill=(0, 0, 0), font=font)
            if n.match is not None:
                f = layout.frame
                draw.rectangle((x - f, y - f, x + layout.tile - 1 + f, y + layout.tile - 1 + f),
                               outline=MATCH if n.match else MISS, width=f)
    return canvas


def precision(queries: list[Query]) -> float | None:
    """Share of neighbours that share a class with their query, over all queries; ``None`` without labels."""
    marks = [n.match for q in queries for n in q.neighbors if n.match is not None]
    return sum(marks) / len(marks) if marks else None


def check_indices(indices, size: int, what: str, data) -> None:
    """Every image index must exist in the data set, else the data is not the checkpoint's."""
    bad = [int(i) for i in indices if not 0 <= int(i) < size]
    if bad:
        raise ValueError(f"{what} refers to image {max(bad)}, but the data set {data or '(built-in synthetic)'} "
                         f"has only {size} images (0..{size - 1}); pass the --data the checkpoint was pretrained on")


def check_same_data(stored: str | None, found: str, checkpoint: str, force: bool = False) -> None:
    """Refuse data other than the checkpoint's (by their fingerprints), unless forced; checkpoints written
    before fingerprints were recorded (mls 0.2) are not checked."""
    if stored is not None and stored != found and not force:
        raise ValueError(f"the data ({found}) is not the data set {checkpoint} was pretrained on ({stored}): "
                         "the queue's image indices would point at other images; pass the checkpoint's "
                         "--data, or --force to draw it anyway")


def checkpoint_data(info: dict, checkpoint: str, data: str | None = None, annotations: str | None = None,
                    force: bool = False) -> tuple[object, dict]:
    """The images a checkpoint was pretrained on (or ``data``, if it is the same data set) and the arguments
    of ``open_source`` that open them; other data than the checkpoint's is refused unless ``force``."""
    stored = info.get("data") or {}
    data_args = {key: stored[key] for key in DATA_KEYS if key in stored}
    if data is not None:
        data_args.update(data=data, annotations=annotations)
    elif annotations is not None:
        data_args["annotations"] = annotations
    source = open_source(**data_args)
    check_same_data(stored.get("fingerprint"), source.fingerprint(), checkpoint, force)
    return source, data_args


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
    from mls.checkpoint import load_pretrained

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
    model, info = load_pretrained(checkpoint)
    stored = queue_bank(model.queue) if bank == "queue" else None
    source, data_args = checkpoint_data(info, checkpoint, data, annotations, force)
    if stored is not None:
        check_indices(stored.index.unique(), len(source), "the checkpoint's queue", data_args.get("data"))
    if query_index:
        check_indices(query_index, len(source), "--query-index", data_args.get("data"))
    crop_size = image_size or data_args.get("image_size") or 224

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        picked = list(query_index) if query_index else torch.randperm(len(source))[:queries].tolist()
        if stored is None:
            n = len(source) if bank_images is None else min(bank_images, len(source))
            stored = dataset_bank(model.backbone_q, source, crop_size, list(range(n)))
        found = search(model.backbone_q, source, stored, picked, k, crop_size, include_query_image)
    figure = render(found, source, Layout(tile=tile))
    atomic_write(out, lambda tmp: figure.save(tmp, format=Image.registered_extensions()[Path(out).suffix.lower()]))
    share = precision(found)
    print(f"wrote {len(found)} queries x {len(found[0].neighbors)} neighbours "
          f"from {bank} ({len(stored.index)} entries) to {out}")
    if share is not None:
        print(f"neighbour precision (shares a class with the query): {share:.3f}")
    return found
