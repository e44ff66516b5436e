"""``mls embed``'s work: every image of a folder or shard set through the encoder, chunk by chunk, resumably.

The images are read by the pretraining's readers (``mls.data.sources.open_source``) and cut as the evaluation
protocols cut a test image (resize, centre crop). A chunk is a fixed run of image indices split into fixed
batches, so its values do not depend on where a run started; with ``--devices N`` each process takes every
N-th missing chunk (Lightning Fabric starts them), and the first assembles the output.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
from lightning.fabric import Fabric
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mls.data.sources import open_source
from mls.embedding import store
from mls.embedding.encoder import CenterCrops, Encoder, file_digest, resolve
from mls.embedding.settings import EmbedRun, EmbedSettings
from mls.files import ensure_writable_folder


def open_images(data: str | None):
    """The image folder or shard set ``data``, and its images' relative names in data-set order."""
    if data is None or data == "synthetic":
        raise ValueError("--data is required: an image folder or a shard set (the built-in scenes: write them "
                         "with `mls synth --format folder --out DIR` first)")
    source = open_source(data)
    return source, source.names()


def run_record(settings: EmbedSettings, data: str, source) -> dict:
    """What ``OUT/embed.json`` keeps: the resolved settings, the weights' digest, the data and its fingerprint."""
    record = dataclasses.asdict(settings)
    weights = settings.weights
    if weights != "random":
        record.update(weights=str(Path(weights).resolve()), weights_sha256=file_digest(weights))
    location = data if "://" in data else str(Path(data).resolve())
    return {**record, "data": location, "fingerprint": source.fingerprint(), "num_images": len(source)}


def chunk_batches(chunks: list[int], ranges: list[range], batch_size: int) -> list[tuple[int, list[int]]]:
    """The batches of the given chunks, each tagged with its chunk: batches never cross a chunk's edge."""
    return [(c, list(ranges[c][s:s + batch_size])) for c in chunks for s in range(0, len(ranges[c]), batch_size)]


def embed_chunks(encoder: Encoder, dataset, chunks: list[int], ranges: list[range], out: Path, workers: int,
                 show: bool = True) -> None:
    """Embed the listed chunks, writing each (``store.write_chunk``) as soon as its last batch is done."""
    batches = chunk_batches(chunks, ranges, encoder.settings.batch_size)
    loader = DataLoader(dataset, batch_sampler=[b for _, b in batches], num_workers=workers,
                        pin_memory=encoder.device.type == "cuda")
    dtype = store.DTYPES[encoder.settings.dtype]
    left = {c: sum(1 for b, _ in batches if b == c) for c in chunks}
    vectors, index, failed = ({c: [] for c in chunks} for _ in range(3))
    for (chunk, _), batch in zip(batches, tqdm(loader, total=len(batches), desc="embed", unit="batch",
                                               disable=not show)):
        ok = torch.tensor([not e for e in batch["error"]], dtype=torch.bool)
        if ok.any():
            vectors[chunk].append(encoder(batch["image"][ok]).to(dtype))
            index[chunk].append(batch["index"][ok])
        failed[chunk] += [(int(i), e) for i, e in zip(batch["index"], batch["error"]) if e]
        left[chunk] -= 1
        if left[chunk] == 0:
            done = torch.cat(vectors.pop(chunk)) if vectors[chunk] else torch.empty(0, 0, dtype=dtype)
            rows = torch.cat(index.pop(chunk)) if index[chunk] else torch.empty(0, dtype=torch.long)
            store.write_chunk(store.chunk_path(out, chunk), done, rows, failed.pop(chunk))


def embed_collection(settings: EmbedSettings, run: EmbedRun) -> dict:
    """``mls embed``: embed every image of ``run.data`` into ``run.out``, resuming an interrupted run there;
    returns a summary (counts, the files written, images/s)."""
    source, names = open_images(run.data)
    out = ensure_writable_folder(run.out)
    fabric = Fabric(accelerator="auto", devices=run.devices, precision="32-true")
    settings, size_origin = resolve(settings, fabric.device.type)
    ranges = store.chunk_ranges(len(source), settings.chunk_size)
    complete = store.check_record(out, run_record(settings, run.data, source))  # before any process is started
    fabric.launch()
    missing = [c for c in range(len(ranges)) if not store.chunk_path(out, c).is_file()]
    start = time.perf_counter()
    if not complete and missing:
        if fabric.is_global_zero:
            print(f"mls embed: {settings.arch} {settings.features} features of {settings.image_size} px centre crops "
                  f"({size_origin})")
        encoder = Encoder(settings, fabric.device)
        mine = missing[fabric.global_rank::fabric.world_size]
        dataset = CenterCrops(source, encoder.transform, settings.image_size)
        embed_chunks(encoder, dataset, mine, ranges, out, run.workers, show=fabric.is_global_zero)
    fabric.barrier()
    seconds = time.perf_counter() - start
    if not fabric.is_global_zero:
        return {}
    if complete:
        print(f"mls embed: {out} already holds this run's complete output; nothing to do")
        return {"complete": True}
    count, skipped = store.assemble(out, len(ranges), names, run.format)
    return report(out, run.format, count, skipped, len(source), missing, ranges, seconds)


def report(out: Path, file_format: str, count: int, skipped: list, num_images: int, computed: list[int],
           ranges: list[range], seconds: float) -> dict:
    """Print what was written, what was skipped and how fast, in a few lines; return the same as a dict."""
    images = sum(len(ranges[c]) for c in computed)
    rate = images / seconds if seconds > 0 and images else 0.0
    target = out / store.EMBEDDINGS[file_format]
    resumed = len(ranges) - len(computed)
    print(f"mls embed: {count:,} of {num_images:,} images embedded into {target}, paths in {out / store.PATHS}"
          + (f"; resumed: {resumed} of {len(ranges)} chunks were already done" if resumed else "")
          + f" ({images:,} images at {rate:.1f} images/s)")
    if skipped:
        shown = "; ".join(f"{name} ({reason})" for name, reason in skipped[:5])
        print(f"skipped {len(skipped)} unreadable: {shown}{' ...' if len(skipped) > 5 else ''} "
              f"(all in {out / store.SKIPPED})")
    print(f"next: mls search --embeddings {out} --all true --out {out / 'search'}")
    return {"embedded": count, "skipped": skipped, "file": str(target), "images_per_s": rate}
