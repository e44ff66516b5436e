"""Helpers shared by the test files: a tiny model, a filled queue, a tiny checkpoint, a report reader, VOC XML,
and ``TINY``, the settings of a pretraining a few steps long.

Import them by name (``from conftest import tiny``); pytest puts this folder on the path.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mls import MLS, MLSConfig
from mls.checkpoints.pretrained import save_pretrained
from mls.data.augment import ViewConfig
from mls.train.module import PretrainModule
from mls.train.settings import PretrainSettings, TrainConfig

# `mls pretrain` settings of a few-step run: 48 built-in scenes of 32 px in batches of 8 (6 steps an epoch)
TINY = dict(num_images=48, batch_size=8, queue_size=24, topk=4, image_size=32, workers=0, log_every=1)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are skipped where no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def tiny(**settings) -> MLS:
    """A small MLS (ResNet-18 with the small stem, D = 32, k = 4, m = 0.9), seeded; ``settings`` override."""
    torch.manual_seed(0)
    return MLS(**{"arch": "resnet18", "small_stem": True, "queue_size": 32, "topk": 4, "momentum": 0.9,
                  "dim": 128, **settings})


def views(n: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Two 16 px views of ``n`` random images, the second a noisy copy of the first."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g)
    return x, x + 0.1 * torch.randn(x.shape, generator=g)


def fill_queue(model: MLS, seed: int = 2) -> None:
    """Random but valid contents in every row of the model's queues, with index = row number."""
    g = torch.Generator().manual_seed(seed)
    d = model.queue.size
    entry = {"z": F.normalize(torch.randn(d, model.queue["z"].shape[1], generator=g), dim=1),
             "index": torch.arange(d), "box": torch.rand(d, 4, generator=g)}
    if "g" in model.queue:
        entry["g"] = F.normalize(torch.randn(d, model.feature_dim, generator=g), dim=1)
    model.queue.push(**entry)


def pretrain_module(model: dict, train: dict | None = None, **options) -> PretrainModule:
    """The Lightning module of a run with these ``MLSConfig`` and ``TrainConfig`` settings (the rest default)."""
    settings = PretrainSettings(MLSConfig(**model), ViewConfig(), TrainConfig(**(train or {})), "paper")
    return PretrainModule(settings, **options)


def tiny_checkpoint(path: Path, data: dict | None = None, prepare: Callable[[MLS], None] | None = None,
                    **settings) -> MLS:
    """A pretraining checkpoint of a small model (ResNet-18, D = 16, k = 2, dz = 16) written by ``save_pretrained``;
    ``prepare(model)`` changes the model first (its weights, its queue)."""
    torch.manual_seed(0)
    model = MLS(**{"arch": "resnet18", "small_stem": False, "queue_size": 16, "topk": 2, "dim": 16, **settings})
    if prepare is not None:
        with torch.no_grad():
            prepare(model)
    save_pretrained(path, model, {"data": data or {}})
    return model


def read_report(out: Path) -> tuple[dict, str]:
    """``results.json`` and ``results.md`` of an evaluation or a transfer run."""
    return json.loads((Path(out) / "results.json").read_text()), (Path(out) / "results.md").read_text()


def voc_xml(objects, size: tuple[int, int] = (12, 12)) -> str:
    """A VOC annotation: ``objects`` as (name, difficult) or (name, difficult, (x0, y0, x1, y1)) tuples."""
    rows = []
    for name, difficult, *box in objects:
        bndbox = "".join(f"<{tag}>{v}</{tag}>" for tag, v in zip(("xmin", "ymin", "xmax", "ymax"), box[0])) if box else ""
        rows.append(f"<object><name>{name}</name><difficult>{difficult}</difficult>"
                    + (f"<bndbox>{bndbox}</bndbox>" if bndbox else "") + "</object>")
    width, height = size
    return (f"<annotation><size><width>{width}</width><height>{height}</height><depth>3</depth></size>"
            f"{''.join(rows)}</annotation>")


def assert_resumed_like_straight(straight: str | Path, resumed: str | Path, steps: int) -> None:
    """A resumed pretraining's checkpoint equals the one of a run that never stopped: its step, every weight and
    buffer (to 1e-6), and which image each key of the queue came from, exactly."""
    from mls.checkpoints.pretrained import read_checkpoint

    a, b = read_checkpoint(straight), read_checkpoint(resumed)
    assert a["global_step"] == b["global_step"] == steps
    for key, value in a["state_dict"].items():
        assert torch.allclose(value.float(), b["state_dict"][key].float(), atol=1e-6), key
    assert torch.equal(a["state_dict"]["model.queue.field_index"], b["state_dict"]["model.queue.field_index"])
