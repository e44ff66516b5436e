"""The settings of ``mls embed`` and ``mls search``, declared once: name, type, default, one-line doc and check.

``EmbedSettings`` holds what the embeddings' values depend on: ``mls embed`` records it in ``OUT/embed.json``,
a resumed run must be given the same, and ``mls search --query`` embeds its images with it. ``EmbedRun`` holds
where the images come from and go, and how the work is spread, which change no value.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mls.method.settings import setting

PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed")


@dataclass(frozen=True)
class EmbedSettings:
    """What an embedding's values depend on; a resumed run must give the same (``OUT/embed.json`` keeps them)."""

    weights: str = setting("random", 'pretraining checkpoint (.ckpt), exported torchvision backbone (.pth/.pt), or '
                                     '"random" (seeded: the same network each time)')
    features: Literal["backbone", "projection"] = setting(
        "backbone", "backbone: the pooled backbone feature g; projection: the projection head's output z "
                    "(pretraining checkpoints only)")
    normalize: bool = setting(True, "L2-normalise each embedding")
    dtype: Literal["float32", "float16"] = setting("float32", "number type of the stored embeddings")
    image_size: int | None = setting(None, "side of the centre crop fed to the network, after resizing the short "
                                           "side to size / 0.875 (default: the pretraining image size that a "
                                           "checkpoint or safetensors export records, else 224)")
    arch: str | None = setting(None, "backbone architecture (default: from the weights, else resnet50)")
    small_stem: bool | None = setting(None, "3x3 stem for small images (default: from the weights, else false)")
    batch_size: int = setting(64, "images per forward pass")
    chunk_size: int = setting(1024, "images per chunk file: an interrupted run resumes at the first missing chunk")
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed"] = setting(
        "auto", "auto: bf16-mixed on a GPU that has bf16, else 16-mixed on a GPU, 32-true on the CPU (mixed: "
                "autocast)")

    def __post_init__(self):
        if self.batch_size < 1 or self.chunk_size < 1:
            raise ValueError(f"--batch-size and --chunk-size must be at least 1, got {self.batch_size}, "
                             f"{self.chunk_size}")
        if self.image_size is not None and self.image_size < 16:
            raise ValueError(f"--image-size must be at least 16, got {self.image_size}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")


@dataclass(frozen=True)
class EmbedRun:
    """Where ``mls embed`` reads and writes, and how the work is spread; none of it changes a value."""

    data: str | None = setting(None, "image folder or shard set (as `mls pretrain --data`), required")
    out: str = setting("runs/embed", "output folder: embeddings, paths.csv, skipped.csv, embed.json; a run into a "
                                     "folder holding an interrupted run's chunks resumes it")
    format: Literal["safetensors", "npy"] = setting("safetensors", "file type of the embeddings: "
                                                                   "embeddings.safetensors or embeddings.npy")
    devices: int = setting(1, "devices (GPUs, or CPU processes) sharing the chunks")
    workers: int = setting(2, "image-reading processes per device")

    def __post_init__(self):
        if self.devices < 1 or self.workers < 0:
            raise ValueError(f"--devices must be at least 1 and --workers at least 0, got {self.devices}, "
                             f"{self.workers}")


@dataclass(frozen=True)
class SearchSettings:
    """What ``mls search`` looks for, in what, and where it writes."""

    embeddings: str = setting("runs/embed", "output folder of `mls embed`")
    query: list[str] | str | None = setting(None, "a query image file, or several: --query '[a.jpg, b.jpg]'; embedded "
                                                  "with the settings `mls embed` recorded")
    all: bool = setting(False, "true: the neighbours of every embedded image (similar and near-duplicate lists)")
    k: int = setting(5, "neighbours per query")
    min_cosine: float | None = setting(None, "keep only neighbours at least this close (e.g. 0.95 for duplicates)")
    engine: Literal["auto", "torch", "faiss"] = setting(
        "auto", "exact search in torch by blocks, or FAISS's exact inner-product index (mls-ssl[faiss]); auto: "
                "torch, the faster of the two at every size measured (docs/benchmarks.md)")
    out: str = setting("runs/search", "output folder: neighbors.csv and neighbors.png")
    sheet_rows: int = setting(8, "queries drawn in neighbors.png (with --all: those with the closest neighbour)")
    tile: int = setting(128, "side in pixels of each image of neighbors.png")

    def __post_init__(self):
        if bool(self.query) == self.all:
            raise ValueError("give either --query IMAGE (or --query '[A, B]') or --all true")
        if self.k < 1 or self.sheet_rows < 0 or self.tile < 16:
            raise ValueError(f"--k must be >= 1, --sheet-rows >= 0 and --tile >= 16, got {self.k}, "
                             f"{self.sheet_rows}, {self.tile}")
        if self.min_cosine is not None and not -1 <= self.min_cosine <= 1:
            raise ValueError(f"--min-cosine is a cosine, between -1 and 1, got {self.min_cosine}")

    @property
    def query_files(self) -> list[str]:
        """``--query`` as a list, however many files it names."""
        return [self.query] if isinstance(self.query, str) else list(self.query or [])
