"""The grids of a study: named sets of variants, each a few option overrides of ``mls pretrain``.

Every grid holds the MoCo-v2 baseline (the reference of the paired differences) and the main paper's
own setting (λ 0.5, k/D ≈ 0.5 %, m 0.995, dz 256, Eq. 9 from the start). The other variants change
the budget's MLS in one respect each: on the built-in scenes, a named base over the demo's preset
(``SCENE_BASES``, ``mls study --base``); with ``--data``, the paper's preset.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from mls.method.extra_losses import EXTRA_LOSSES
from mls.train.settings import PretrainSettings

PAPER_K_OVER_D = 20 / 4096  # k = 20 of D = 4,096 (§4.1)
PAPER_D_OVER_N = 4096 / 118_287  # D = 4,096 for COCO train2017's images

# The grids' MLS on the built-in scenes (``mls study --base``): options over the demo's preset. A study records its
# base with every cell, so that a stored cell keeps its meaning and a printed command reruns the same cells.
SCENE_BASES: dict[str, dict] = {
    # the demo as it ships: what `mls pretrain` runs without --data (λ = 0.25, the recommended extra loss)
    "demo": {},
    # the demo of mls 0.4 to 0.5.0, at λ = 1 (otherwise the demo's settings): the base the tables in docs/study measured
    "demo-0.4": {"extra_weight": 1.0},
}
SceneBase = Literal["demo", "demo-0.4"]  # the names of SCENE_BASES, for the command line
# the base of a stored scene cell that names none: cells from before bases were recorded used the demo of mls 0.4
UNRECORDED_BASE = "demo-0.4"


def on_scenes(options: dict) -> bool:
    return options.get("data") in (None, "synthetic")


def scene_base(options: dict, base: str | None) -> dict:
    """The options of ``base`` for a cell on the built-in scenes; none with ``data`` (whose cells start from the
    paper's preset as it is, see ``cell_preset``)."""
    if not on_scenes(options):
        return {}
    if base not in SCENE_BASES:
        raise ValueError(f"--base must be one of {', '.join(SCENE_BASES)}, got {base!r}")
    return SCENE_BASES[base]


def cell_options(options: dict, base: str | None = "demo") -> dict:
    """A cell's ``pretrain`` options over the grids' base (``base`` of ``SCENE_BASES`` on the built-in scenes; with
    ``data``, none: the paper's preset as it is, see ``cell_preset``)."""
    return {**scene_base(options, base), **options}


def cell_preset(options: dict) -> str:
    """The preset a cell starts from: the demo's on the built-in scenes, the paper's with ``data`` (whatever
    ``mls pretrain --data`` defaults to), so that a stored cell keeps its meaning."""
    return "demo" if on_scenes(options) else "paper"


def resolve_cell(options: dict, base: str | None = "demo") -> PretrainSettings:
    """A cell's settings: its options over the grids' base and preset."""
    options = cell_options(options, base)
    return PretrainSettings.resolve(options, cell_preset(options))


@dataclass(frozen=True)
class Budget:
    """How long each cell pretrains (``pretrain`` options) and how it is scored."""

    pretrain: dict = field(default_factory=dict)
    probe_images: int = 1000  # labelled training images of the probe; a fifth of them is the validation split
    probe_epochs: int = 100  # epochs of the linear layer
    queries: int = 200  # query crops of the neighbour precision
    k: int = 20  # neighbours per query of the neighbour precision
    # a labelled set in VOC2007's layout (e.g. a part of benchmarks/real_photos.py's set) that the probes read
    # instead of generated scenes: validation carved from its trainval list, test its test list
    probe_data: str | None = None


BUDGETS = {
    # a few steps, for the tests
    "tiny": Budget(dict(num_images=48, batch_size=8, queue_size=24, topk=4, image_size=32, arch="resnet18",
                        small_stem=True, epochs=1, max_steps=2, workers=0, log_every=1),
                   probe_images=40, probe_epochs=2, queries=4, k=4),
    "demo": Budget(),  # the CPU demo: 8 epochs over 2,000 scenes (a cell's time: docs/study/README.md)
    "long": Budget(dict(epochs=32)),  # 4x the demo
}


def load_budget(budget: str) -> Budget:
    """A named budget, or a YAML file with ``pretrain`` options and the probe's settings."""
    if budget in BUDGETS:
        return BUDGETS[budget]
    path = Path(budget)
    if not path.is_file():
        raise ValueError(f"--budget must be one of {', '.join(BUDGETS)} or a YAML file, got {budget!r}")
    return Budget(**(yaml.safe_load(path.read_text()) or {}))


def scaled_k(queue_size: int) -> int:
    """The paper's share of positives, k/D = 20/4,096, at another queue size (at least 1)."""
    return max(1, round(PAPER_K_OVER_D * queue_size))


def _always(d: int) -> dict[str, dict]:
    paper = dict(method="mls", mls_loss="bce", select_from="g", logits_from="z", extra_weight=0.5, topk=scaled_k(d),
                 momentum=0.995, dim=256, bce_balanced=False, extra_start_epoch=0)
    return {"mocov2": {"method": "mocov2"}, "paper": paper}


TABLE6_ORDER = ("knn", "bce_pos", "bce")  # Table 6's rows: + k-NN softmax, + BCE-pos, + BCE


def _table6(s: PretrainSettings) -> dict[str, dict]:
    """Table 6: each extra loss of the registry, the paper's three in its order, then any other registered one."""
    names = [*TABLE6_ORDER, *(name for name in EXTRA_LOSSES if name not in TABLE6_ORDER)]
    return {name: {"mls_loss": name} for name in names}


def _table7(s: PretrainSettings) -> dict[str, dict]:
    return {"both_queues": {}, "qg_only": {"select_from": "g", "logits_from": "g"},
            "qz_only": {"select_from": "z", "logits_from": "z"}}


def _table8(s: PretrainSettings) -> dict[str, dict]:
    return {f"k{k}": {"topk": k} for k in (1, 5, 20, 40) if k < s.model.queue_size}


def _queue(s: PretrainSettings) -> dict[str, dict]:
    """Fig. 5a: D at 1/4 to 16x the paper's ratio of queue to data set, below the number of images.

    D is also the length of InfoNCE's queue of negatives, so each D gets its MoCo-v2 control
    (``mocov2_D<d>``, the reference of its paired differences): MLS against MoCo-v2 at the same D.
    """
    n = s.train.num_images if s.train.data is None else None
    if n is None:
        from mls.data.sources import open_source

        n = len(open_source(s.train.data, annotations=s.train.annotations))
    cells = {}
    for factor in (0.25, 1, 4, 16):
        d = round(PAPER_D_OVER_N * n * factor)
        if 2 <= d < n:
            k = min(scaled_k(d), d - 1)  # MoCo-v2 logs the precision of its own top-k in Q_z
            cells[f"D{d}"] = {"queue_size": d, "topk": k}
            cells[f"mocov2_D{d}"] = {"method": "mocov2", "queue_size": d, "topk": k}
    return cells


def _lambda(s: PretrainSettings) -> dict[str, dict]:
    return {f"lambda{w:g}": {"extra_weight": w} for w in (0.1, 0.25, 0.5, 1.0, 2.0)}


def _balance(s: PretrainSettings) -> dict[str, dict]:
    """Ways of weighting the extra loss against InfoNCE (the imbalance of D - k negatives to k positives)."""
    eq9 = {"bce_balanced": False, "extra_start_epoch": 0}
    return {
        "eq9": eq9,
        "balanced": {"bce_balanced": True},
        "bias_fixed": {**eq9, "logit_bias": "fixed"},
        "bias_learned": {**eq9, "logit_bias": "learned"},
        "mask_positives": {"mask_positives": True},
        "ramp": {"extra_start_epoch": 0, "extra_ramp_epochs": 4},
        "extra_tau": {"extra_tau": 0.1},
    }


def _health(s: PretrainSettings) -> dict[str, dict]:
    """Why the paper's setting (Eq. 9 from the first step) degrades the features at a short budget
    (docs/study/health): the paper's setting with a 2-epoch warm-up of InfoNCE alone, balanced from the
    first step, with its negative terms alone (k = 0: no pseudo-positive, the test of the explanation's
    prediction), and MoCo-v2 with the paper's key momentum and embedding size (the paper's setting differs
    from the demo's MoCo-v2 in those too), the control of the ``paper`` variants."""
    paper = _always(s.model.queue_size)["paper"]
    return {
        "paper_warmup": {**paper, "extra_start_epoch": 2},
        "paper_balanced": {**paper, "bce_balanced": True},
        "mocov2_paper": {"method": "mocov2", "momentum": paper["momentum"], "dim": paper["dim"]},
        "paper_negatives": {**paper, "topk": 0},
    }


def _watch(s: PretrainSettings) -> dict[str, dict]:
    """The health watch's out-of-sample check (docs/study/watch): runs expected healthy (MoCo-v2, the recommended
    extra loss, the paper's setting after a 2-epoch warm-up) and runs expected harmful (the paper's setting from
    the first step at λ 0.5, and at λ 1), under each budget's data, batch, image size and queue."""
    paper = _always(s.model.queue_size)["paper"]
    return {
        "recommended": {"method": "mls", "mls_loss": "bce", "bce_balanced": True, "extra_weight": 0.25,
                        "extra_start_epoch": 2},
        "paper_warmup": {**paper, "extra_start_epoch": 2},
        "paper_lambda1": {**paper, "extra_weight": 1.0},
    }


GRIDS = {"table6": _table6, "table7": _table7, "table8": _table8, "queue": _queue, "lambda": _lambda,
         "balance": _balance, "health": _health, "watch": _watch}


def grid_cells(name: str, budget: Budget, data: str | None = None, only: list[str] | None = None,
               base: str = "demo") -> dict[str, dict]:
    """Variant name -> overrides of ``pretrain`` for a named grid, or for a YAML file (name -> overrides).

    The MoCo-v2 baseline and the paper's setting come first in every grid; ``only`` keeps the named variants
    (and their MoCo-v2 controls, ``mocov2_<name>``, where the grid has them). ``base``: the cells' base on the
    built-in scenes (``SCENE_BASES``); with ``data`` the only one is the default, the paper's preset as it is.
    """
    if not on_scenes({"data": data}) and base != "demo":
        raise ValueError(f"--base {base} is a base of the built-in scenes; with --data a grid varies the paper's preset")
    settings = resolve_cell({**budget.pretrain, "data": data}, base)
    if name in GRIDS:
        variants = GRIDS[name](settings)
    elif Path(name).is_file():
        variants = yaml.safe_load(Path(name).read_text()) or {}
        if not isinstance(variants, dict) or not all(isinstance(v, dict) for v in variants.values()):
            raise ValueError(f"{name}: a grid file maps each variant's name to its options, e.g. 'k5: {{topk: 5}}'")
    else:
        raise ValueError(f"--grid must be one of {', '.join(GRIDS)} or a YAML file, got {name!r}")
    cells = {**_always(settings.model.queue_size), **variants}
    if only:
        unknown = sorted(set(only) - set(cells))
        if unknown:
            raise ValueError(f"--only names {unknown}, not variants of {name}: {', '.join(cells)}")
        kept = {"mocov2", *only, *(f"mocov2_{v}" for v in only)}  # with each one's own MoCo-v2 control
        cells = {k: v for k, v in cells.items() if k in kept}
    for overrides in cells.values():  # every cell must make a valid run: refuse it now, not hours later
        resolve_cell({**budget.pretrain, "data": data, **overrides}, base)
    return cells
