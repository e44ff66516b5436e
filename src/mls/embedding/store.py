"""The files of ``mls embed``: chunk files written as the work goes, the settings they were made with, and the
final embeddings with their table of paths, assembled from the chunks at the end; and reading them back.

An output folder ``OUT`` holds, while a run goes on, ``embed.json`` (the resolved settings and the data's
fingerprint) and ``chunks/00012.safetensors`` (the embeddings of images 12·C .. 13·C-1, C the chunk size,
without the unreadable ones, which it names). Every file is written atomically, so a run killed at any moment
leaves whole chunks only, and a new run into ``OUT`` computes only the missing ones. At the end the chunks are
concatenated in order into ``embeddings.safetensors`` (or ``.npy``), ``paths.csv`` and ``skipped.csv``, then
removed: the same bytes whether the run was interrupted or not.
"""
from __future__ import annotations

import csv
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mls.files import atomic_write

RECORD, PATHS, SKIPPED, CHUNKS = "embed.json", "paths.csv", "skipped.csv", "chunks"
EMBEDDINGS = {"safetensors": "embeddings.safetensors", "npy": "embeddings.npy"}
DTYPES = {"float32": torch.float32, "float16": torch.float16}


def chunk_path(out: Path, chunk: int) -> Path:
    return Path(out) / CHUNKS / f"{chunk:05d}.safetensors"


def chunk_ranges(num_images: int, chunk_size: int) -> list[range]:
    """The image indices of each chunk, in order."""
    return [range(start, min(start + chunk_size, num_images)) for start in range(0, num_images, chunk_size)]


def write_table(path: Path, header: tuple[str, ...], rows: list) -> None:
    """A CSV file with a header line, written atomically."""
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(header)
            writer.writerows(rows)

    atomic_write(path, write)


def write_chunk(path: Path, embeddings: torch.Tensor, index: torch.Tensor, skipped: list[tuple[int, str]]) -> None:
    """One chunk, atomically: the readable images' embeddings and data-set indices, and the unreadable ones."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"embeddings": embeddings.contiguous(), "index": index.long().contiguous()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"skipped": json.dumps(skipped)}))


def read_chunk(path: Path) -> tuple[torch.Tensor, torch.Tensor, list]:
    with safe_open(str(path), "pt") as f:
        skipped = json.loads(f.metadata()["skipped"])
    tensors = load_file(str(path))
    return tensors["embeddings"], tensors["index"], skipped


def check_record(out: Path, record: dict) -> bool:
    """Write ``record`` (the resolved settings) as ``OUT/embed.json``, or check that the one there is the same;
    True when ``OUT`` already holds that run's complete output."""
    path = Path(out) / RECORD
    if path.is_file():
        stored = json.loads(path.read_text())
        differ = sorted(key for key in set(stored) | set(record) if stored.get(key) != record.get(key))
        if differ:
            shown = "; ".join(f"{key}: {stored.get(key)!r} there, {record.get(key)!r} now" for key in differ[:4])
            raise ValueError(f"{out} holds the output of another `mls embed` run, with other settings ({shown}); "
                             "give the same options to resume it, or choose another --out")
        return not (Path(out) / CHUNKS).exists() and (Path(out) / PATHS).is_file() and any(
            (Path(out) / name).is_file() for name in EMBEDDINGS.values())
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n"))
    return False


def assemble(out: Path, num_chunks: int, names: list[str], file_format: str) -> tuple[int, list[tuple[str, str]]]:
    """The chunks concatenated in order into the embeddings file, ``paths.csv`` (path, data-set index) and
    ``skipped.csv`` (path, reason), each written atomically, then the chunks removed.
    Returns the number of embeddings and the skipped images."""
    parts, indices, skipped = [], [], []
    for chunk in range(num_chunks):
        embeddings, index, unreadable = read_chunk(chunk_path(out, chunk))
        if embeddings.numel():
            parts.append(embeddings)
        indices += index.tolist()
        skipped += [(names[i], reason) for i, reason in unreadable]
    embeddings = torch.cat(parts) if parts else torch.empty(0, 0)
    target = Path(out) / EMBEDDINGS[file_format]
    if file_format == "npy":
        atomic_write(target, lambda tmp: np.save(tmp, embeddings.numpy()))
    else:
        atomic_write(target, lambda tmp: save_file({"embeddings": embeddings}, tmp))
    write_table(Path(out) / SKIPPED, ("path", "reason"), skipped)
    write_table(Path(out) / PATHS, ("path", "index"), [(names[i], i) for i in indices])
    shutil.rmtree(Path(out) / CHUNKS)
    return len(embeddings), skipped


@dataclass
class Embeddings:
    """An ``mls embed`` output read back: the vectors (N x d), each one's path and data-set index, the settings."""

    vectors: torch.Tensor
    paths: list[str]
    index: list[int]
    record: dict


def read_vectors(folder: Path) -> tuple[torch.Tensor, Path]:
    """The embeddings file of an output folder, whichever format it was written in."""
    for file_format, name in EMBEDDINGS.items():
        path = Path(folder) / name
        if path.is_file():
            if file_format == "npy":
                return torch.from_numpy(np.load(path)), path
            return load_file(str(path))["embeddings"], path
    raise FileNotFoundError(f"{folder} holds no {' or '.join(EMBEDDINGS.values())}: not a finished `mls embed` "
                            "output (run mls embed --out there again to finish it)")


def open_embeddings(folder: str | Path) -> Embeddings:
    """Read an ``mls embed`` output; an embeddings file and a path table of different lengths are refused."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"embeddings folder {str(folder)!r} does not exist; run mls embed --out there first")
    vectors, path = read_vectors(folder)
    if not (folder / PATHS).is_file() or not (folder / RECORD).is_file():
        raise FileNotFoundError(f"{folder} lacks {PATHS} or {RECORD}: not a finished `mls embed` output")
    with open(folder / PATHS, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if len(rows) != len(vectors):
        raise ValueError(f"{path} holds {len(vectors)} embeddings but {folder / PATHS} lists {len(rows)} paths: "
                         "the files are not of one run; run mls embed again into a new --out")
    record = json.loads((folder / RECORD).read_text())
    return Embeddings(vectors, [r["path"] for r in rows], [int(r["index"]) for r in rows], record)
