"""Shard sets: `mls shard` stores every readable image's bytes in name order, and pretraining on the shards is
pretraining on the folder (same views, same losses, same resumption, same split across ranks)."""
import csv
import hashlib
import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from litdata import StreamingDataset
from PIL import Image

from conftest import assert_resumed_like_straight
from mls.checkpoints.pretrained import read_checkpoint
from mls.cli import main
from mls.data.images import load_pixels
from mls.data.sharding import chunk_bytes, shard
from mls.data.shards import MANIFEST, ShardSource, is_shard_set
from mls.train import pretrain
from mls.train.data_module import PretrainData
from mls.train.module import PretrainModule

# a pretraining of a few steps on 32 px images in batches of 8
RUN = dict(arch="resnet18", image_size=32, batch_size=8, queue_size=16, topk=2, epochs=1, workers=0, seed=3,
           log_every=1)


def write_folder(folder: Path, n: int, seed: int = 0) -> list[str]:
    """``n`` random 40 px JPEGs in two subfolders; their relative names, sorted."""
    rng = np.random.default_rng(seed)
    names = [f"{'ab'[i % 2]}/img{i:03d}.jpg" for i in range(n)]
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / name, quality=90)
    return sorted(names)


def write_odd_and_bad(folder: Path) -> tuple[list[str], list[str]]:
    """Readable odd images (grey, 16-bit, CMYK, palette) and unreadable files; the names of each."""
    Image.fromarray(np.full((20, 30), 90, np.uint8), "L").save(folder / "odd_grey.png")
    Image.fromarray((np.arange(64, dtype=np.uint16) * 1000).reshape(8, 8)).save(folder / "odd_16bit.png")
    Image.fromarray(np.full((8, 8, 4), 60, np.uint8), "CMYK").save(folder / "odd_cmyk.jpg")
    Image.fromarray(np.array([[0, 1], [1, 2]], dtype=np.uint8), "P").save(folder / "odd_palette.png")
    good = (folder / "odd_grey.png").read_bytes()
    (folder / "bad_truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "bad_empty.jpg").write_bytes(b"")
    (folder / "bad_text.jpg").write_text("not an image")
    return (["odd_16bit.png", "odd_cmyk.jpg", "odd_grey.png", "odd_palette.png"],
            ["bad_empty.jpg", "bad_text.jpg", "bad_truncated.png"])


def stored_items(shards: Path) -> list[dict]:
    """Every item of a shard set, read by litdata itself."""
    dataset = StreamingDataset(str(shards))
    return [dataset[i] for i in range(len(dataset))]


def test_shard_round_trips_every_readable_image_and_counts_the_unreadable(tmp_path, capsys):
    folder = tmp_path / "imgs"
    names = write_folder(folder, 30)
    odd, bad = write_odd_and_bad(folder)
    manifest = shard(str(folder), out=str(tmp_path / "shards"), workers=1)
    readable = sorted(names + odd)
    items = stored_items(tmp_path / "shards")
    assert [item["name"] for item in items] == readable  # in the order of the sorted names
    for item in items:
        assert bytes(item["image"]) == (folder / item["name"]).read_bytes(), item["name"]
    assert manifest["num_images"] == len(readable) and manifest["skipped"] == len(bad)
    assert sorted(u["name"] for u in manifest["unreadable"]) == bad
    digest = hashlib.sha256("\n".join(readable).encode()).hexdigest()[:12]
    assert manifest["fingerprint"] == f"image folder: {len(readable)} images, names {digest}"
    assert json.loads((tmp_path / "shards" / MANIFEST).read_text()) == manifest
    assert "skipped 3 unreadable: " in capsys.readouterr().out

    source = ShardSource(tmp_path / "shards")
    assert len(source) == len(readable) and is_shard_set(tmp_path / "shards") and not is_shard_set(folder)
    for i, name in enumerate(readable):  # decoded as the folder's files are
        assert torch.equal(source.pixels(i), load_pixels(folder / name)), name
        assert torch.equal(torch.from_numpy(np.asarray(source.image(i))), torch.from_numpy(
            np.asarray(Image.open(folder / name).convert("RGB")))) or name == "odd_16bit.png"


@pytest.mark.slow
def test_several_writers_keep_the_order_of_the_names(tmp_path):
    folder = tmp_path / "imgs"
    names = write_folder(folder, 120)
    shard(str(folder), out=str(tmp_path / "shards"), size="40KB", workers=2)  # ~4 KB images: many chunks
    assert len(list((tmp_path / "shards").glob("*.bin"))) > 4
    assert [item["name"] for item in stored_items(tmp_path / "shards")] == names


def test_shard_refuses_bad_folders_before_writing(tmp_path):
    folder = tmp_path / "imgs"
    write_folder(folder, 3)
    with pytest.raises(ValueError, match="needs --out"):
        shard(str(folder))
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        shard(str(tmp_path / "missing"), out=str(tmp_path / "a"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        shard(str(folder), out=str(tmp_path / "full"))
    with pytest.raises(ValueError, match="--size: got 'abc', expected a size such as 64MB"):
        shard(str(folder), out=str(tmp_path / "c"), size="abc")
    assert not (tmp_path / "c").exists()
    assert (chunk_bytes("64MB"), chunk_bytes("40 kb"), chunk_bytes("1.5GB")) == (64 * 1024**2, 40 * 1024, 3 * 1024**3 // 2)
    with pytest.raises(ValueError, match="writes to a local folder or an s3:// URL"):
        shard(str(folder), out="gs://bucket/shards")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_text("no")
    with pytest.raises(ValueError, match="none of the 1 image files"):
        shard(str(tmp_path / "bad"), out=str(tmp_path / "b"), workers=1)
    assert not (tmp_path / "b").exists()
    with pytest.raises(FileNotFoundError, match="not a shard set"):
        ShardSource(tmp_path / "full")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / MANIFEST).write_text(json.dumps({"format": "mls shards 1", "num_images": 1}))
    with pytest.raises(FileNotFoundError, match="not litdata's index.json"):
        ShardSource(tmp_path / "half")


def test_a_shard_set_behind_a_url_is_read_through_the_cache(tmp_path):
    """``local:`` is litdata's stand-in for a bucket: files are fetched into the cache, as from s3://."""
    folder = tmp_path / "imgs"
    names = write_folder(folder, 10)
    shard(str(folder), out=str(tmp_path / "shards"), workers=1)
    remote = ShardSource(f"local:{tmp_path / 'shards'}", cache_dir=str(tmp_path / "cache"))
    assert (tmp_path / "cache" / MANIFEST).is_file() and len(remote) == 10
    for i in (0, 9):
        assert torch.equal(remote.pixels(i), load_pixels(folder / names[i]))


def test_annotations_label_the_shards_by_name(tmp_path):
    folder = tmp_path / "imgs"
    names = write_folder(folder, 4)
    coco = {"images": [{"id": k, "file_name": name} for k, name in enumerate(reversed(names))],
            "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
            "annotations": [{"image_id": 0, "category_id": 7}, {"image_id": 3, "category_id": 3}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    shard(str(folder), out=str(tmp_path / "shards"), workers=1)
    source = ShardSource(tmp_path / "shards", annotations=str(tmp_path / "coco.json"))
    # image id 0 is the last name (dog), id 3 the first (cat)
    assert [source.labels(i) for i in range(4)] == [[0], [], [], [1]] and source.classes == ("cat", "dog")


def first_batch(data: str) -> dict:
    loader = PretrainData(data, image_size=32, batch_size=8, workers=0, seed=3).train_dataloader()
    return next(iter(loader))


def loss_rows(out: Path) -> list[str]:
    (path,) = (out / "csv").glob("version_*/metrics.csv")
    with open(path) as f:
        return [row["train/loss"] for row in csv.DictReader(f) if row.get("train/loss")]


@pytest.mark.slow
def test_shards_and_their_folder_give_the_same_views_losses_and_weights(tmp_path):
    folder = tmp_path / "imgs"
    write_folder(folder, 32)
    shard(str(folder), out=str(tmp_path / "shards"), workers=1)
    a, b = first_batch(str(folder)), first_batch(str(tmp_path / "shards"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    runs = {}
    for name, data in (("folder", folder), ("shards", tmp_path / "shards")):
        runs[name] = pretrain(data=str(data), out=str(tmp_path / name), **RUN)  # one epoch: 4 steps
    assert loss_rows(tmp_path / "folder") == loss_rows(tmp_path / "shards") and len(loss_rows(tmp_path / "folder")) == 4
    x, y = (read_checkpoint(runs[name]) for name in ("folder", "shards"))
    for key, value in x["state_dict"].items():
        assert torch.equal(value, y["state_dict"][key]), key
    assert x["hyper_parameters"]["data"]["fingerprint"] == y["hyper_parameters"]["data"]["fingerprint"]
    # a run on the folder goes on on its shards: the same images, by their fingerprint
    resumed = pretrain(data=str(tmp_path / "shards"), out=str(tmp_path / "folder"), resume="auto",
                       **{**RUN, "epochs": 2})
    assert read_checkpoint(resumed)["global_step"] == 8
    # the figures find the images again in the shards, by the queue's image indices
    main(["visualize", "neighbors", "--checkpoint", str(runs["shards"]), "--out", str(tmp_path / "nb.png"),
          "--queries", "2", "--k", "3"])
    assert Image.open(tmp_path / "nb.png").size[0] > 0


class Crash(Exception):
    """Stands for a failure in the middle of an epoch."""


@pytest.mark.slow
def test_a_run_on_shards_resumed_mid_epoch_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    """Stopped in the middle of epoch 1 (4 steps an epoch), with the images read by two worker processes."""
    folder = tmp_path / "imgs"
    write_folder(folder, 32)
    shards = str(tmp_path / "shards")
    shard(str(folder), out=shards, workers=1)
    common = {**RUN, "epochs": 2, "workers": 2, "data": shards}
    straight = pretrain(out=str(tmp_path / "straight"), **common)

    def crash(module, outputs, batch, batch_idx):
        if module.global_step == 6:
            raise Crash

    monkeypatch.setattr(PretrainModule, "on_train_batch_end", crash, raising=False)
    with pytest.raises(Crash):
        pretrain(out=str(tmp_path / "split"), **common)
    monkeypatch.undo()
    resumed = pretrain(out=str(tmp_path / "split"), resume="auto", **common)
    assert_resumed_like_straight(straight, resumed, 8)


@pytest.mark.slow
def test_resume_refuses_a_shard_set_of_other_images(tmp_path):
    for name, n in (("a", 24), ("b", 25)):
        write_folder(tmp_path / name, n)
        shard(str(tmp_path / name), out=str(tmp_path / f"{name}.shards"), workers=1)
    out = tmp_path / "run"
    main(["pretrain", "--data", str(tmp_path / "a.shards"), "--out", str(out), "--max-steps", "1",
          *[f"--{k.replace('_', '-')}={v}" for k, v in RUN.items()]])
    with pytest.raises(ValueError, match="pretrained on other data: image folder: 24 images.*25 images"):
        pretrain(data=str(tmp_path / "b.shards"), out=str(out), resume="auto", max_steps=2, **RUN)


def epoch_loader(data: str, batch_size: int, world: int, rank: int, workers: int):
    """The pretraining loader of epoch 0 on rank ``rank`` of ``world``, as the trainer would ask for it."""
    module = PretrainData(data, image_size=32, batch_size=batch_size, workers=workers, seed=3)
    at_start = SimpleNamespace(started=0, processed=0)
    module.trainer = SimpleNamespace(world_size=world, global_rank=rank, fit_loop=SimpleNamespace(
        epoch_progress=SimpleNamespace(current=at_start),
        epoch_loop=SimpleNamespace(batch_progress=SimpleNamespace(current=SimpleNamespace(processed=0)))))
    return module.train_dataloader()


def rank_worker(rank: int, init_file: str, data: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    batches = list(epoch_loader(data, 4, world=2, rank=rank, workers=2))
    torch.save(batches, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_on_shards_see_each_image_once_in_the_global_batches_of_one_rank(tmp_path):
    """With 2 gloo processes (each with 2 loader workers) the shards are split as one process with the global
    batch reads them: every global batch holds the same images with the same views, each image once an epoch.
    The model-level half (2 ranks x B == 1 rank x 2B) is test_distributed's."""
    folder = tmp_path / "imgs"
    write_folder(folder, 35)  # 35 = 4 global batches of 8 + 3 dropped
    shards = str(tmp_path / "shards")
    shard(str(folder), out=shards, workers=1)
    assert_two_ranks_split_one_rank_s_batches(tmp_path, shards, shards)


def assert_two_ranks_split_one_rank_s_batches(tmp_path: Path, data: str, local: str) -> None:
    """2 gloo processes reading ``data`` (35 images) split what one process reads from the same set at ``local``
    with the global batch: every global batch holds the same images with the same views, each image once an epoch."""
    mp.spawn(rank_worker, args=(str(tmp_path / "init"), data, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    one = list(epoch_loader(local, 8, world=1, rank=0, workers=0))
    assert len(one) == len(ranks[0]) == len(ranks[1]) == 4
    seen = []
    for k, whole in enumerate(one):
        parts = [ranks[r][k] for r in range(2)]
        indices = torch.cat([p["index"] for p in parts])
        assert sorted(indices.tolist()) == sorted(whole["index"].tolist())
        for key in ("view1", "view2", "box2"):
            by_index = dict(zip(whole["index"].tolist(), whole[key]))
            for part in parts:
                for i, value in zip(part["index"].tolist(), part[key]):
                    assert torch.equal(value, by_index[i]), (k, key, i)
        seen += indices.tolist()
    assert len(seen) == len(set(seen)) == 32  # no image twice; only drop_last's 3 left out
