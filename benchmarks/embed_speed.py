"""`mls embed`'s images/s against the pretraining loader's, in one run on one folder of JPEGs.

Writes a folder of JPEGs (benchmarks/shard_loading.py's: built-in scenes at 640 x 480 with noise, about COCO's
file size) and measures, with the same workers and batch size:
  (a) the pretraining loader as `mls pretrain --data` builds it (decode, crop, flip in the workers; two views per
      image), images/s;
  (b) `mls embed`'s loader alone (decode, resize, centre crop, normalise; one crop per image), images/s;
  (c) `mls embed` end to end (loader, network, chunk files, assembly), images/s;
and prints (b)/(a) and (c)/(a). On a CPU the network dominates (c); (b) says whether reading keeps up.

    OMP_NUM_THREADS=1 python benchmarks/embed_speed.py                   # 400 JPEGs, ResNet-18 at 224 px
    python benchmarks/embed_speed.py --arch resnet50 --images 5000       # on a GPU machine
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from mls.data.images import ImageFolderSource
from mls.embedding.commands import embed
from mls.embedding.encoder import CenterCrops
from mls.eval.transforms import test_transform
from shard_loading import images_per_second, loader_images_per_second, write_scenes


def embed_loader_images_per_second(folder: Path, size: int, workers: int, batch_size: int) -> float:
    dataset = CenterCrops(ImageFolderSource(folder), test_transform(size), size)
    return images_per_second(DataLoader(dataset, batch_size=batch_size, num_workers=workers))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        write_scenes(folder, args.images)
        pretraining = loader_images_per_second(str(folder), args.workers, args.batch_size)
        reading = embed_loader_images_per_second(folder, args.image_size, args.workers, args.batch_size)
        summary = embed(data=str(folder), out=str(Path(tmp) / "embed"), weights="random", arch=args.arch,
                        image_size=args.image_size, batch_size=args.batch_size, workers=args.workers)
    end_to_end = summary["images_per_s"]
    print(f"{args.images} JPEGs of 640 x 480, {args.workers} workers, batch {args.batch_size}, "
          f"{args.arch} at {args.image_size} px, torch threads {torch.get_num_threads()}, "
          f"{'cuda' if torch.cuda.is_available() else 'cpu'}")
    print("| reading | images/s | / pretraining loader |")
    print("|---|---|---|")
    print(f"| pretraining loader (two 224 px views per image) | {pretraining:.0f} | 1.00 |")
    print(f"| mls embed's loader alone (one centre crop) | {reading:.0f} | {reading / pretraining:.2f} |")
    print(f"| mls embed end to end | {end_to_end:.1f} | {end_to_end / pretraining:.2f} |")


if __name__ == "__main__":
    main()
