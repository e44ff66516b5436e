"""Nearest neighbours of a crop among stored or freshly embedded crops, and how often they share a class.

What it is for:

- the nearest-neighbour figures of the paper (supplement B.3, Fig. 5-6; ``mls visualize neighbors``
  draws them with ``mls.viz.neighbors``): a query crop and its top-k entries of ``Q_g``. The search is
  the paper's label selection itself (``mls.method.selection``): cosine similarity of ``ĝ1`` to ``Q_g``;
- the pseudo-label precision, the share of a query's neighbours that share a true class with it: per
  training step over the selected pseudo-labels (``step_label_precision``, logged as
  ``train/label_precision``), and after pretraining over a search (``neighbor_precision``: ``mls study``,
  ``benchmarks/demo_precision.py``);
- the inputs both figure commands share (``open_pretrained``): a checkpoint's model, the images it was
  pretrained on (other data is refused by its fingerprint) and the bank of crops its queue holds.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as TF

from mls.checkpoints.pretrained import load_pretrained
from mls.data.augment import MoCoV2View
from mls.data.sources import open_source
from mls.method.selection import cosine_similarity, topk_indices

DATA_KEYS = ("data", "annotations", "num_images", "image_size", "seed")  # the arguments of open_source
DEFAULT_CROP_SIZE = 224  # when neither the options nor the checkpoint give an image size


@dataclass
class Bank:
    """Features searched for neighbours, with where each came from: the valid part of the queue, or fresh crops."""

    g: Tensor  # (N, dg) L2-normalised backbone features
    index: Tensor  # (N,) dataset index of the source image
    box: Tensor  # (N, 4) normalised crop box (x0, y0, x1, y1)


@dataclass
class Neighbor:
    """One entry of the bank found near a query."""

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


def queue_bank(queue: nn.Module, purpose: str = "use --bank dataset") -> Bank:
    """The valid entries of ``Q_g`` that know their source image; fails in one line, ending in ``purpose``
    (what the caller needs them for, or what to do instead), when there are none."""
    if "g" not in queue:
        raise ValueError("the checkpoint's queue keeps no Q_g (a MoCo-v2 run, or one pretrained without "
                         f"--store-g true): {purpose}")
    keep = queue.valid & (queue["index"] >= 0)
    if not bool(keep.any()):
        raise ValueError("the checkpoint's queue holds no entries with a known source image (index and box): "
                         f"it was saved before any batch carried them, or before the queue was written; {purpose}")
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


def neighbor_precision(queries: list[Query]) -> float | None:
    """Share of neighbours that share a class with their query, over all queries; ``None`` without labels."""
    marks = [n.match for q in queries for n in q.neighbors if n.match is not None]
    return sum(marks) / len(marks) if marks else None


def step_label_precision(labels: Tensor, query_index: Tensor, neighbor_index: Tensor) -> Tensor:
    """Share of selected neighbours that share at least one true class with their query (one training step).

    ``labels`` is the data set's multi-hot table, ``neighbor_index`` (N x k) the source
    images of each query's pseudo-positives (-1: unknown, left out). NaN when none is known.
    """
    known = (neighbor_index >= 0).float()
    query = labels[query_index].bool()[:, None, :]
    neighbors = labels[neighbor_index.clamp(min=0)].bool()
    shared = (query & neighbors).any(-1).float()
    return (shared * known).sum() / known.sum()  # 0/0 = NaN when no neighbour is known


def check_indices(indices, size: int, what: str, data) -> None:
    """Every image index must exist in the data set, else the data is not the checkpoint's."""
    bad = [int(i) for i in indices if not 0 <= int(i) < size]
    if bad:
        raise ValueError(f"{what} refers to image {max(bad)}, but the data set {data or '(built-in synthetic)'} "
                         f"has only {size} images (0..{size - 1}); pass the --data the checkpoint was pretrained on")


def check_same_data(stored: str | None, found: str, checkpoint: str, force: bool = False) -> None:
    """Refuse data other than the checkpoint's (by their fingerprints), unless forced; checkpoints written
    before fingerprints were recorded (see ``mls.checkpoints.versions``) are not checked."""
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


@dataclass
class Pretrained:
    """A pretraining checkpoint opened for a search: its model, the images it was pretrained on, the bank
    of its queue (``None`` when not asked for) and the size of the crops fed to the backbone."""

    model: nn.Module
    source: object
    bank: Bank | None
    image_size: int


def open_pretrained(checkpoint: str, data: str | None = None, annotations: str | None = None,
                    query_index: list[int] | None = None, image_size: int | None = None,
                    queue_purpose: str | None = None, force: bool = False) -> Pretrained:
    """Load ``checkpoint``, its queue's bank (when ``queue_purpose`` says what it is for, see ``queue_bank``)
    and the data it was pretrained on, and check that the bank's and ``query_index``'s images are in it.

    The crop size is ``image_size``, else the pretraining image size, else 224.
    """
    model, info = load_pretrained(checkpoint)
    bank = None if queue_purpose is None else queue_bank(model.queue, queue_purpose)
    source, data_args = checkpoint_data(info, checkpoint, data, annotations, force)
    if bank is not None:
        check_indices(bank.index.unique(), len(source), "the checkpoint's queue", data_args.get("data"))
    if query_index:
        check_indices(query_index, len(source), "--query-index", data_args.get("data"))
    crop_size = image_size or data_args.get("image_size") or DEFAULT_CROP_SIZE
    return Pretrained(model, source, bank, crop_size)
