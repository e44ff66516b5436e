"""Score histograms (main paper Fig. 3): why MLS selects pseudo-labels from ``Q_g`` rather than ``Q_z``.

For a query crop, two distributions over the entries of the queue:

- **backbone scores** ``ĝ1·Q_gᵀ``: cosine of the crop's L2-normalised pooled backbone feature to each entry;
- **MLP scores** ``z1·Q_zᵀ``: cosine of its normalised projection ``z1`` to each entry,

each for the network before and after pretraining, with the top-k threshold (the score of the k-th
nearest entry, k = the checkpoint's ``topk``) marked: entries at or above it are the query's pseudo-labels.

Like is compared with like: a random network has no queue, so **both networks score the query against a
bank they embed themselves, from the very crops the checkpoint's queue holds** (for every written entry
of ``Q_g`` with a known source: image ``queue["index"]`` cropped at ``queue["box"]``, resized to the
pretraining size, without flip or colour changes). Backbone scores are taken against that bank's ``ĝ``,
MLP scores against its ``z``. "after" is the checkpoint's query encoder; "before" is, by default, the same
architecture with freshly initialised weights (``type(model)(model.config)`` under ``torch.manual_seed(seed)``),
or the query encoder of another checkpoint. The query crop is one MoCo-v2 random-resized crop (no flip,
colour or blur), the same for both networks. Entries cropped from the query image itself are kept, as in
training, where nothing removes them from the queue.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mls.files import atomic_write, ensure_writable
from mls.method.selection import cosine_similarity
from mls.neighbor_search import Bank, crop_view, embed_boxes, open_pretrained
from mls.viz.curves import DPI, agg_figure

NETWORKS = ("before", "after")
KINDS = {"backbone": "backbone scores ĝ1·Q_gᵀ", "mlp": "MLP scores z1·Q_zᵀ"}
COLORS = {"before": "tab:gray", "after": "tab:blue"}
SCORE_PANEL_INCHES = (4.5, 3.0)


@dataclass
class QueryScores:
    """One query crop and its scores against the bank: ``scores[network][kind]`` (N,), ``threshold`` alike.

    ``network`` is ``before`` or ``after``, ``kind`` is ``backbone`` (ĝ1 against the bank's ĝ) or ``mlp``
    (z1 against the bank's z). ``threshold`` is the k-th largest score (``None`` when k = 0).
    """

    index: int
    box: tuple[float, float, float, float]
    scores: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    threshold: dict[str, dict[str, float | None]] = field(default_factory=dict)


@dataclass
class ScoreHistograms:
    """What ``score_histograms`` computed and drew: the queries, the bank, k and the matplotlib figure."""

    queries: list[QueryScores]
    bank: Bank
    k: int
    figure: object  # matplotlib.figure.Figure: 2 axes per query (backbone, MLP)
    json_path: Path | None = None


def encoder(model: nn.Module):
    """``x -> (ĝ, z)``: the query encoder's L2-normalised pooled backbone feature and normalised projection."""
    model.eval()

    def encode(x: Tensor) -> tuple[Tensor, Tensor]:
        g, z = model.encode_query(x)
        return F.normalize(g.flatten(1).float(), dim=1), z.float()

    return encode


@torch.no_grad()
def score_queries(model: nn.Module, source, bank: Bank, query_indices: list[int], query_boxes: Tensor,
                  image_size: int) -> dict[str, Tensor]:
    """Backbone and MLP scores (Q x N) of each query crop against the bank the model embeds from ``bank``'s crops."""
    encode = encoder(model)
    bank_g, bank_z = embed_boxes(encode, source, bank.index.tolist(), bank.box, image_size)
    query_g, query_z = embed_boxes(encode, source, query_indices, query_boxes, image_size)
    return {"backbone": cosine_similarity(query_g, bank_g), "mlp": cosine_similarity(query_z, bank_z)}


def kth_largest(scores: Tensor, k: int) -> float | None:
    """The score of the k-th nearest entry (the last pseudo-label); all entries when fewer than k."""
    return float(scores.topk(min(k, len(scores))).values[-1]) if k > 0 else None


def draw(queries: list[QueryScores], k: int, bins: int, labels: dict[str, str]):
    """One row per query: backbone scores, MLP scores; before and after overlaid as densities, thresholds dashed."""
    figure = agg_figure(figsize=(SCORE_PANEL_INCHES[0] * 2, SCORE_PANEL_INCHES[1] * len(queries)), dpi=DPI)
    axes = figure.subplots(len(queries), 2, squeeze=False)
    for row, q in zip(axes, queries):
        for ax, kind in zip(row, KINDS):
            values = torch.cat([q.scores[n][kind] for n in NETWORKS])
            edges = torch.linspace(float(values.min()), float(values.max()) + 1e-6, bins + 1).tolist()
            for net in NETWORKS:
                ax.hist(q.scores[net][kind].numpy(), bins=edges, density=True, alpha=0.5, color=COLORS[net],
                        label=labels[net])
                if q.threshold[net][kind] is not None:
                    ax.axvline(q.threshold[net][kind], color=COLORS[net], linestyle="--", linewidth=1.2,
                               label=f"top-{k} threshold ({net})")
            ax.set_title(f"query #{q.index}: {KINDS[kind]}", fontsize=10)
            ax.set_xlabel("cosine similarity")
            ax.set_ylabel("density")
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def output_paths(checkpoint: str | None, out: str, before: str, queries: int, bins: int) -> tuple[Path, Path]:
    """The figure's path and the numbers' (``.json``) beside it, once the options and checkpoints are usable."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if checkpoint is None:
        raise ValueError("--checkpoint is required: the pretraining checkpoint whose Q_g crops are scored")
    if queries < 1 or bins < 1:
        raise ValueError(f"--queries and --bins must be >= 1, got {queries}, {bins}")
    out_path = ensure_writable(out)
    formats = FigureCanvasAgg.get_supported_filetypes()
    if out_path.suffix.lower().lstrip(".") not in formats:
        raise ValueError(f"--out {out!r} needs an image extension matplotlib writes, such as .png, .pdf or .svg")
    json_path = ensure_writable(out_path.with_suffix(".json"))
    for path in (checkpoint, None if before == "random" else before):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    return out_path, json_path


def before_network_and_queries(model: nn.Module, before: str, source, query_index: list[int] | None, queries: int, seed: int,
                 crop_size: int) -> tuple[nn.Module, list[int], Tensor]:
    """Under ``seed`` (the global random state left as it was): the network before pretraining, the query
    images (``query_index``, else ``queries`` at random) and one random-resized crop box of each."""
    from mls.checkpoints.pretrained import load_pretrained

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if before == "random":
            untrained = type(model)(model.config)
        else:
            untrained, _ = load_pretrained(before)
        picked = list(query_index) if query_index else torch.randperm(len(source))[:queries].tolist()
        view = crop_view(crop_size)
        boxes = torch.stack([view(source.image(i)).box for i in picked])
    return untrained, picked, boxes


def split_by_query(picked: list[int], boxes: Tensor, scored: dict[str, dict[str, Tensor]], k: int) -> list[QueryScores]:
    """One ``QueryScores`` per query crop from the networks' Q x N scores, with each distribution's top-k threshold."""
    found = []
    for q, (index, box) in enumerate(zip(picked, boxes.tolist())):
        scores = {net: {kind: scored[net][kind][q] for kind in KINDS} for net in NETWORKS}
        found.append(QueryScores(index, tuple(box), scores,
                                 {net: {kind: kth_largest(s, k) for kind, s in by_kind.items()}
                                  for net, by_kind in scores.items()}))
    return found


def write_record(json_path: Path, checkpoint: str, before: str, k: int, crop_size: int, seed: int, bank: Bank,
                 found: list[QueryScores]) -> None:
    """The raw numbers of the figure as JSON: settings, the bank's crops, each query's box, thresholds and scores."""
    record = {
        "checkpoint": str(checkpoint), "before": before, "k": k, "image_size": crop_size, "seed": seed,
        "bank": {"index": bank.index.tolist(), "box": bank.box.tolist()},
        "queries": [{"index": q.index, "box": list(q.box), "threshold": q.threshold,
                     "scores": {net: {kind: s.tolist() for kind, s in by_kind.items()}
                                for net, by_kind in q.scores.items()}} for q in found],
    }
    atomic_write(json_path, lambda tmp: Path(tmp).write_text(json.dumps(record)))


def score_histograms(checkpoint: str | None, out: str = "scores.png", before: str = "random",
                     data: str | None = None, annotations: str | None = None, queries: int = 1,
                     query_index: list[int] | None = None, seed: int = 0, bins: int = 50,
                     image_size: int | None = None) -> ScoreHistograms:
    """Compute and draw Fig. 3; write the figure to ``out`` and the raw numbers to ``out`` with ``.json``.

    See the module docstring for what is scored against what.
    """
    out_path, json_path = output_paths(checkpoint, out, before, queries, bins)
    opened = open_pretrained(checkpoint, data, annotations, query_index, image_size,
                             "score histograms need the crops of Q_g's entries")
    model, source, bank, crop_size = opened.model, opened.source, opened.bank, opened.image_size
    k = model.config.topk
    untrained, picked, boxes = before_network_and_queries(model, before, source, query_index, queries, seed, crop_size)
    scored = {"before": score_queries(untrained, source, bank, picked, boxes, crop_size),
              "after": score_queries(model, source, bank, picked, boxes, crop_size)}
    found = split_by_query(picked, boxes, scored, k)
    labels = {"before": "before (random init)" if before == "random" else f"before ({Path(before).name})",
              "after": f"after ({Path(checkpoint).name})"}
    figure = draw(found, k, bins, labels)
    atomic_write(out_path, lambda tmp: figure.savefig(tmp, dpi=DPI, format=out_path.suffix.lower().lstrip(".")))
    write_record(json_path, checkpoint, before, k, crop_size, seed, bank, found)
    return ScoreHistograms(found, bank, k, figure, json_path)


def scores(checkpoint: str | None = None, before: str = "random", data: str | None = None,
           annotations: str | None = None, queries: int = 1, query_index: list[int] | None = None, seed: int = 0,
           bins: int = 50, out: str = "scores.png", image_size: int | None = None) -> None:
    """Histograms of a query crop's backbone scores ĝ1·Q_gᵀ and MLP scores z1·Q_zᵀ, before and after (Fig. 3).

    Both networks score the query against a bank they embed themselves from the crops that the
    checkpoint's Q_g holds (each entry's source image cropped at its stored box), so a random
    network is compared with the trained one on the same entries. The top-k threshold (k = the
    checkpoint's topk) is dashed. The raw scores go to OUT with the extension ``.json``.

    Args:
        checkpoint: Pretraining checkpoint (``.ckpt``) whose queue keeps Q_g (an MLS run, or --store-g true).
        before: ``random`` (the same architecture, freshly initialised under --seed) or another checkpoint.
        data: Image folder or COCO root the checkpoint was trained on; default: the checkpoint's own data.
        annotations: COCO annotation file for ``data``.
        queries: Number of query images drawn at random (ignored when ``query_index`` is given).
        query_index: Data-set indices of the query images, e.g. ``'[3,17]'``.
        seed: Seed of the query images, their crops and the random network's weights.
        bins: Histogram bins per panel.
        out: Output figure (``.png``, ``.pdf``, ``.svg``); the numbers go beside it as ``.json``.
        image_size: Crop size fed to the networks; default: the pretraining image size.
    """
    result = score_histograms(checkpoint, out=out, before=before, data=data, annotations=annotations,
                              queries=queries, query_index=query_index, seed=seed, bins=bins, image_size=image_size)
    print(f"scored {len(result.queries)} queries against {len(result.bank.index)} crops of Q_g (k = {result.k}); "
          f"wrote {out} and {result.json_path}")
    for q in result.queries:
        parts = []
        for kind in KINDS:
            for net in NETWORKS:
                s, t = q.scores[net][kind], q.threshold[net][kind]
                parts.append(f"{kind} {net}: mean {float(s.mean()):.3f}"
                             + ("" if t is None else f", top-{result.k} >= {t:.3f}"))
        print(f"query #{q.index}: " + "; ".join(parts))
