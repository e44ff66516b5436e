"""Images read from a shard set: chunk files written by ``mls shard`` (``litdata.optimize``), on a disk or in a bucket.

A shard set is a folder (or a URL litdata reads: ``s3://``, ``gs://``, ``azure://``, ``hf://``...) holding
litdata's ``index.json`` and chunks, whose items are ``{"name": relative file name, "image": the file's
bytes}`` in the order of the sorted names, and ``mls_shards.json``, our manifest: the image count, the
fingerprint a folder run of the same images records, the images skipped as unreadable, and
``names.txt`` (the names in index order, read only to match COCO annotations).

Image ``i`` of a shard set is image ``i`` of the folder it was made from (unless the folder had
unreadable files, which the shards leave out), so the sampler, the per-image seeding of the views, the
queue's image indices and the figures work on shards as on a folder. Images are read one at a time by
index (``StreamingDataset[i]``): from a local chunk with one seek; from a bucket, each chunk is downloaded
whole into litdata's cache the first time one of its images is read (``ShardSource.record`` says why).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import torch
from filelock import FileLock
from PIL import Image

from mls.data.buckets import check_readable, is_s3
from mls.data.images import decode_pixels, decode_rgb, labels_to_multi_hot, read_coco_labels

MANIFEST = "mls_shards.json"
NAMES = "names.txt"
INDEX = "index.json"  # litdata's list of chunks
FORMAT = "mls shards 1"
REMOTE_PREFIXES = ("s3://", "gs://", "azure://", "hf://", "r2://", "local:")


def is_remote(location: str) -> bool:
    """Whether ``location`` is a URL litdata downloads from rather than a local folder."""
    return str(location).startswith(REMOTE_PREFIXES)


def is_shard_set(location: str | os.PathLike) -> bool:
    """Whether ``--data`` names a shard set: any URL, or a local folder holding the manifest."""
    return is_remote(str(location)) or (Path(location) / MANIFEST).is_file()


def _cache_folder(location: str, cache_dir: str | None) -> Path:
    """Where the files of a remote shard set (its manifest, names, then chunks) are kept: ``cache_dir``, or one
    folder per URL under ``$MLS_CACHE`` (default ``~/.cache/mls``)/shards."""
    if cache_dir is not None:
        return Path(cache_dir)
    root = Path(os.environ.get("MLS_CACHE", Path.home() / ".cache" / "mls"))
    return root / "shards" / hashlib.sha1(location.encode()).hexdigest()[:16]


def _fetch(location: str, name: str, cache_dir: str | None) -> Path:
    """The local path of the file ``name`` of a shard set: in the folder itself, or downloaded into the cache
    (afresh each time, into a file of this process's, then renamed: ranks on one node may fetch at once)."""
    if not is_remote(location):
        path = Path(location) / name
        if not path.is_file():
            raise FileNotFoundError(f"{location} is not a shard set made by `mls shard`: no {name} in it")
        return path
    from litdata.streaming.downloader import get_downloader

    folder = _cache_folder(location, cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    local, partial = folder / name, folder / f".{name}.{os.getpid()}"
    try:
        get_downloader(location, str(folder), []).download_file(f"{location.rstrip('/')}/{name}", str(partial))
    except Exception as error:  # each store raises its own kind, some with pages of detail: the first line
        raise FileNotFoundError(f"cannot read {name} of the shard set {location}: "
                                f"{str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}"
                                ) from error
    os.replace(partial, local)
    return local


def read_manifest(location: str, cache_dir: str | None = None) -> dict:
    """The manifest of a shard set, checked to be one this version reads."""
    with open(_fetch(location, MANIFEST, cache_dir)) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{location}: shard format {manifest.get('format')!r}, this version of mls reads {FORMAT!r}")
    return manifest


class ShardSource:
    """The images of a shard set, optionally labelled by a COCO annotation file; same interface as
    ``ImageFolderSource``: ``image(i)``, ``pixels(i)``, ``labels(i)``, ``classes``, ``multi_hot()``,
    ``fingerprint()``.

    ``cache_dir``: where the manifest and names of a remote set are kept (``_cache_folder``), and litdata's
    index and chunks (under ``chunks/``).
    Each process opens its own ``StreamingDataset`` on first read (worker processes included).
    """

    def __init__(self, location: str | os.PathLike, annotations: str | None = None, cache_dir: str | None = None):
        self.location = str(location)
        self.cache_dir = cache_dir
        if is_s3(self.location):  # credentials, bucket and files, in one line each, before any training
            check_readable(self.location, (MANIFEST, INDEX))
        self.manifest = read_manifest(self.location, cache_dir)
        if not is_remote(self.location) and not (Path(self.location) / INDEX).is_file():
            raise FileNotFoundError(f"{self.location} holds the manifest of a shard set but not litdata's {INDEX}: "
                                    "copy or shard the whole folder again")
        self.classes: tuple[str, ...] | None = None
        self._labels: list[list[int]] | None = None
        self._dataset, self._opened_in = None, None
        if is_remote(self.location):
            # litdata's index fetched once, before worker processes start; the ranks of a node one after the
            # other (litdata waits 1 s for another process's download of it, then fails)
            with FileLock(str(_cache_folder(self.location, cache_dir) / ".open.lock")):
                self._open()
        if annotations is not None:
            self._label_by_name(annotations)

    def names(self) -> list[str]:
        """The images' relative names (those of the folder they were sharded from), in index order."""
        return _fetch(self.location, NAMES, self.cache_dir).read_text().splitlines()

    def _label_by_name(self, annotations: str) -> None:
        """Labels from a COCO annotation file, matched to the shards' images by relative name."""
        names = self.names()
        files, labels, self.classes = read_coco_labels(annotations)
        by_name = dict(zip(files, labels))
        absent = [name for name in names if name not in by_name]
        if absent:
            raise ValueError(f"{len(absent)} of the {len(names)} images of {self.location} are not in {annotations}, "
                             f"e.g. {', '.join(absent[:3])}")
        self._labels = [by_name[name] for name in names]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_dataset": None}  # a worker process opens its own reader

    def __len__(self) -> int:
        return int(self.manifest["num_images"])

    def fingerprint(self) -> str:
        """The fingerprint of the images the shards hold: the folder's when none was left out."""
        return self.manifest["fingerprint"]

    def record(self, i: int) -> dict:
        """Item ``i`` as stored: ``{"name": relative file name, "image": the file's bytes}``."""
        if not 0 <= i < len(self):
            raise IndexError(f"image {i} of a shard set of {len(self)}")
        if self._dataset is None or self._opened_in != os.getpid():  # a forked worker opens its own
            self._open()
        return self._dataset[i]

    def _open(self) -> None:
        """This process's ``StreamingDataset``; a remote set's index and chunks in ``chunks/`` of the cache."""
        from litdata import StreamingDataset

        chunks = str(_cache_folder(self.location, self.cache_dir) / "chunks") if is_remote(self.location) else None
        dataset = StreamingDataset(self.location, cache_dir=chunks)
        # litdata 0.2.76 reads one item of a remote chunk by a ranged request that misreads the chunks its
        # own optimize writes for these items (an Arrow row footer): read whole chunks, kept in its cache
        dataset._on_demand_bytes = False
        self._dataset, self._opened_in = dataset, os.getpid()

    def _encoded(self, i: int) -> tuple[bytearray, str]:
        """Image ``i``'s file bytes (one copy of what litdata read) and a name for messages (the set, then the file)."""
        item = self.record(i)
        return bytearray(item["image"]), f"{self.location}:{item['name']}"

    def image(self, i: int) -> Image.Image:
        """Image ``i`` as 8-bit RGB; ``UnreadableImage`` if it cannot be decoded."""
        data, name = self._encoded(i)
        return decode_rgb(io.BytesIO(data), name)

    def pixels(self, i: int) -> torch.Tensor:
        """Image ``i`` as a uint8 (3, H, W) tensor (``decode_pixels``); ``UnreadableImage`` if it cannot be decoded."""
        data, name = self._encoded(i)
        return decode_pixels(torch.frombuffer(data, dtype=torch.uint8), name)

    def labels(self, i: int) -> list[int] | None:
        """0-based class indices of image ``i``, or ``None`` without annotations."""
        return None if self._labels is None else list(self._labels[i])

    def multi_hot(self) -> torch.Tensor | None:
        """(len, num_classes) 0/1 float tensor of the labels, or ``None`` without annotations."""
        return None if self._labels is None else labels_to_multi_hot(self._labels, len(self.classes))
