"""Reading pretraining images from a folder or from its shard set (`mls shard`), in one run.

Writes a folder of JPEGs (built-in scenes at 640 x 480 with noise, about COCO's file size), shards it, and measures:
  (a) `mls shard` itself: images/s, checking and writing;
  (b) reading the encoded bytes alone, one process, images in the sampler's random order;
  (c) the pretraining loader as `mls pretrain` builds it (views made on the device: the workers decode,
      crop and flip), images/s over --workers processes;
and checks that both give the same first batch of views. Each reader is measured --repeats times,
alternating, on a warm page cache (the folder's files and the chunks were just written); the median counts.

    python benchmarks/shard_loading.py              # 2,000 images, 2 workers (about 3 min on 2 cores)
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mls.data.images import ImageFolderSource
from mls.data.sharding import shard
from mls.data.shards import ShardSource
from mls.data.synthetic import SyntheticScenes
from mls.train.data_module import PretrainData


def write_scenes(folder: Path, n: int) -> None:
    """Built-in scenes at 640 x 480 with sensor-like noise: JPEGs of about COCO's size (160 KB on average)."""
    scenes, rng = SyntheticScenes(n, 128, seed=0), np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(n):
        pixels = np.asarray(scenes.image(i).resize((640, 480)), dtype=np.float32)
        noisy = np.clip(pixels + rng.normal(0, 10, pixels.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / f"{i:06d}.jpg", quality=90)


def drop_page_cache() -> bool:
    """Empty the system's page cache (root on Linux), so that the next read comes from the disk; False where
    it cannot."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def bytes_per_second(source, order: list[int], cold: bool = False) -> float:
    if cold:
        drop_page_cache()
    start = time.perf_counter()
    for i in order:
        if isinstance(source, ShardSource):
            source.record(i)
        else:
            source.path(i).read_bytes()
    return len(order) / (time.perf_counter() - start)


def same(a, b) -> bool:
    """Equal batches: tensors element by element, dicts and lists (the appearance parameters) entry by entry."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[key], b[key]) for key in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def loader(data: str, workers: int, batch_size: int) -> DataLoader:
    return PretrainData(data, image_size=224, batch_size=batch_size, workers=workers, seed=0,
                        augment_on="device").train_dataloader()


def images_per_second(batches) -> float:
    """Images a loader yields per second after its first batch (its workers have started then)."""
    batches = iter(batches)
    next(batches)
    start, seen = time.perf_counter(), 0
    for batch in batches:
        seen += len(batch["index"])
    return seen / (time.perf_counter() - start)


def loader_images_per_second(data: str, workers: int, batch_size: int, cold: bool = False) -> float:
    if cold:
        drop_page_cache()
    return images_per_second(loader(data, workers, batch_size))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder, shards = Path(tmp) / "images", Path(tmp) / "shards"
        write_scenes(folder, args.images)
        megabytes = sum(p.stat().st_size for p in folder.iterdir()) / 2**20
        start = time.perf_counter()
        shard(str(folder), out=str(shards), workers=args.workers)
        shard_rate = args.images / (time.perf_counter() - start)
        sources = {"folder": ImageFolderSource(folder), "shards": ShardSource(shards)}
        first = [next(iter(loader(str(data), 0, args.batch_size))) for data in (folder, shards)]
        order = torch.randperm(args.images, generator=torch.Generator().manual_seed(0)).tolist()
        cold = drop_page_cache()
        rows = {("bytes", False): "encoded bytes, 1 process, page cache warm",
                ("loader", False): f"pretraining loader, {args.workers} workers, 224 px views, warm"}
        if cold:
            rows.update({("bytes", True): "encoded bytes, 1 process, page cache emptied first",
                         ("loader", True): f"pretraining loader, {args.workers} workers, 224 px views, emptied first"})
        rates = {(row, name): [] for row in rows for name in sources}
        for _ in range(args.repeats):
            for (what, cold_start) in rows:
                for name, data in (("folder", folder), ("shards", shards)):
                    rate = (bytes_per_second(sources[name], order, cold_start) if what == "bytes" else
                            loader_images_per_second(str(data), args.workers, args.batch_size, cold_start))
                    rates[(what, cold_start), name].append(rate)
    print(f"{args.images} JPEGs of 640 x 480 ({megabytes:.0f} MB), {args.workers} workers, "
          f"torch threads 1, median of {args.repeats}" + ("" if cold else "; the page cache could not be emptied here"))
    print(f"mls shard: {shard_rate:.0f} images/s (checking and writing)")
    print("| reading | folder (images/s) | shards (images/s) | shards / folder |")
    print("|---|---|---|---|")
    for row, label in rows.items():
        f, s = (statistics.median(rates[row, name]) for name in ("folder", "shards"))
        print(f"| {label} | {f:.0f} | {s:.0f} | {s / f:.2f} |")
    print(f"same first batch of views: {'yes' if same(*first) else 'NO'}")


if __name__ == "__main__":
    main()
