"""``mls shard``: an image folder converted once into a shard set that ``mls pretrain --data`` streams.

The images are checked (decoded once, as training would), the unreadable ones left out and counted, and
the readable ones written by ``litdata.optimize`` as ``{"name", "image"}`` items (the file's bytes, nothing
re-encoded) in the order of their sorted names, then ``names.txt`` and the manifest (``mls.data.shards``).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import re
import tempfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

from mls.data.buckets import check_writable, is_s3, upload_folder
from mls.data.images import ImageFolderSource, UnreadableImage, image_set_fingerprint, load_rgb
from mls.data.shards import FORMAT, MANIFEST, NAMES, is_remote
from mls.files import atomic_write, ensure_writable_folder

# unreadable files named in the manifest (all are counted)
LISTED_UNREADABLE = 100
# worker processes: forked where the system can (they start in milliseconds and only read and decode files
# with PIL); spawned elsewhere, which re-imports torch in each (seconds)
START_METHOD = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"


UNITS = {"": 1, "b": 1, "kb": 2**10, "k": 2**10, "mb": 2**20, "m": 2**20, "gb": 2**30, "g": 2**30}


def chunk_bytes(size: str) -> int:
    """``"64MB"`` -> 67108864: a chunk size in bytes, KB, MB or GB (powers of 1024, as litdata counts)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(size))
    unit = match.group(2).lower() if match else None
    if unit not in UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"--size: got {size!r}, expected a size such as 64MB, 512KB or 1GB")
    return int(float(match.group(1)) * UNITS[unit])


def unreadable_reason(path: str) -> str | None:
    """Why training could not use the image file ``path`` (``load_rgb`` fails on it), or ``None``."""
    try:
        load_rgb(path)
    except UnreadableImage as error:
        return error.reason
    return None


def check_images(folder: ImageFolderSource, workers: int) -> tuple[list[str], list[dict]]:
    """The folder's readable names (sorted) and, for the others, ``{"name", "reason"}``; decoded in ``workers``
    processes with a progress bar."""
    paths = [str(folder.path(i)) for i in range(len(folder))]
    bar = dict(total=len(paths), desc="checking images", unit="img", smoothing=0.05, disable=None)  # none in a log file
    if workers <= 1:
        reasons = list(tqdm(map(unreadable_reason, paths), **bar))
    else:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(START_METHOD)) as pool:
            reasons = list(tqdm(pool.map(unreadable_reason, paths, chunksize=64), **bar))
    readable = [name for name, reason in zip(folder.files, reasons) if reason is None]
    unreadable = [{"name": name, "reason": reason} for name, reason in zip(folder.files, reasons) if reason is not None]
    return readable, unreadable


def shard_item(name_and_path: tuple[str, str]) -> dict:
    """One stored item: the image's relative name and its file's bytes."""
    name, path = name_and_path
    return {"name": name, "image": Path(path).read_bytes()}


@contextmanager
def _output_folder(out: str) -> Iterator[Path]:
    """The folder the shard set is written in: ``out``, empty, created if need be (removed again if the work
    fails before writing in it); for an empty ``s3://`` prefix (checked first), a temporary folder."""
    if is_s3(out):
        check_writable(out)
        with tempfile.TemporaryDirectory(prefix="mls-shard-") as staging:
            yield Path(staging)
        return
    if is_remote(out):
        raise ValueError(f"--out {out}: mls shard writes to a local folder or an s3:// URL; copy it to another store "
                         "afterwards (e.g. `gsutil rsync OUT gs://bucket/path`), then pass the URL to --data")
    folder = ensure_writable_folder(out)
    if any(folder.iterdir()):
        raise FileExistsError(f"--out {out} is not empty; shard into a new folder (an interrupted `mls shard` leaves "
                              f"one without {MANIFEST}: delete it and shard again)")
    try:
        yield folder
    except BaseException:
        if not any(folder.iterdir()):
            folder.rmdir()  # still empty: nothing is left behind
        raise


def _write_json(path: Path, data: dict) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
    atomic_write(path, write)


def shard(data: str, out: str | None = None, size: str = "64MB", workers: int | None = None) -> dict:
    """Convert an image folder (recursively, e.g. COCO's train2017/) into a shard set for ``--data``.

    Each readable image's file is stored as it is, with its relative name, in chunks of about ``size``;
    unreadable files are left out, counted and named in the manifest. Pretraining on the shards draws
    the same views as on the folder (same image indices, same seeds). An ``s3://bucket/path`` is written
    in a temporary folder, then uploaded (the manifest last); stream it from there with ``--data``.

    Args:
        data: the image folder.
        out: a new (or empty) local folder, or an empty s3:// prefix, for the shard set (required).
        size: the largest chunk, as litdata writes it (e.g. 64MB, 256MB).
        workers: processes checking and writing images (default: the CPU count, at most 8).
    """
    import litdata

    if out is None:
        raise ValueError("mls shard needs --out: a new folder for the shard set")
    size_bytes = chunk_bytes(size)
    workers = min(os.cpu_count() or 1, 8) if workers is None else workers
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    folder = ImageFolderSource(data)
    with _output_folder(out) as target:
        readable, unreadable = check_images(folder, workers)
        if not readable:
            raise ValueError(f"none of the {len(folder)} image files in {data} can be read, e.g. "
                             f"{unreadable[0]['name']}: {unreadable[0]['reason']}")
        litdata.optimize(fn=shard_item, inputs=[(name, str(folder.root / name)) for name in readable],
                         output_dir=str(target), chunk_bytes=size_bytes, num_workers=min(workers, len(readable)),
                         keep_data_ordered=True, reorder_files=False, start_method=START_METHOD, verbose=True)
        manifest = shard_manifest(folder, readable, unreadable, size)
        atomic_write(target / NAMES, lambda tmp: Path(tmp).write_text("\n".join(readable) + "\n"))
        _write_json(target / MANIFEST, manifest)  # last: a set without it is not a shard set
        if is_s3(out):
            upload_folder(target, out, last=MANIFEST)
        print(shard_report(manifest, target, out))
    return manifest


def shard_manifest(folder: ImageFolderSource, readable: list[str], unreadable: list[dict], size: str) -> dict:
    """What ``mls.data.shards`` reads back: format, count, fingerprint, and the images left out."""
    from mls import __version__

    return {"format": FORMAT, "num_images": len(readable), "fingerprint": image_set_fingerprint(readable),
            "source": str(folder.root.resolve()), "chunk_bytes": size, "skipped": len(unreadable),
            "unreadable": unreadable[:LISTED_UNREADABLE], "mls_version": __version__}


def shard_report(manifest: dict, target: Path, out: str) -> str:
    """The command's last lines: what was written in ``target`` (to ``out``), and what was left out."""
    chunks = sorted(target.glob("*.bin"))
    megabytes = sum(p.stat().st_size for p in chunks) / 2**20
    lines = [f"{manifest['num_images']} images in {len(chunks)} chunks ({megabytes:.1f} MB) in {out}"]
    if manifest["skipped"]:
        shown = manifest["unreadable"][:3]
        lines.append(f"skipped {manifest['skipped']} unreadable: " + "; ".join(
            f"{u['name']} ({u['reason']})" for u in shown) + (" ..." if manifest["skipped"] > len(shown) else ""))
    lines.append(f"next: mls pretrain --data {out}")
    return "\n".join(lines)
