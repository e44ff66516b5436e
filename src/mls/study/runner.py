"""Running a study: every (variant, seed) cell pretrains through ``mls pretrain`` and is scored once.

A cell's result is keyed by its resolved settings and seed: a finished cell is never run again (also
when another grid names the same settings differently, e.g. table6's ``bce`` and table7's
``both_queues``), and an interrupted one goes on from its checkpoint. Seeds vary the whole
pretraining (weights, data order, views, and the built-in scenes themselves), so the spread over
seeds is the noise a difference is judged against.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import torch

from mls.checkpoints.pretrained import backbone_info
from mls.eval.datasets import load_dataset, validation_split
from mls.eval.metrics import classification_metrics
from mls.eval.probes import Task, knn_classify, linear_probe
from mls.files import atomic_write
from mls.neighbor_search import dataset_bank, neighbor_precision, open_pretrained, search
from mls.progress import Progress
from mls.study.grids import (
    UNRECORDED_BASE,
    Budget,
    SceneBase,
    cell_options,
    cell_preset,
    grid_cells,
    load_budget,
    on_scenes,
    resolve_cell,
)
from mls.study.outputs import write_outputs
from mls.train import pretrain
from mls.train.resume import last_checkpoint
from mls.train.settings import PRESETS

# settings that do not change what a run learns (views are drawn per seed, epoch and image, whatever the workers;
# the --monitor pass leaves the training as it was)
BOOKKEEPING = ("save_every", "log_every", "workers", "logger", "project", "run_name", "progress",
               "monitor", "monitor_every", "monitor_images", "monitor_split")


def cell_key(options: dict, seed: int, base: str | None = "demo") -> str:
    """A short stable name for the settings a cell resolves to (every setting, defaults included, over ``base`` on
    the built-in scenes) and its seed: two ways of writing the same run share a key, and a run under other
    defaults does not."""
    resolved = resolve_cell({**options, "seed": seed}, base)
    settings = {name: value for name, value in resolved.values().items() if name not in BOOKKEEPING}
    settings["augment_on"] = resolved.train.views_on  # auto is cpu here and device on a GPU machine
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def load_results(path: Path) -> dict:
    """results.json with every cell under the key of its settings as this version computes it, so that a
    change to what a key covers never runs a finished cell again. A cell is keyed over the base it records
    (a scene cell that records none is older than bases: it had the demo of mls 0.4, ``UNRECORDED_BASE``)."""
    results = json.loads(path.read_text()) if path.is_file() else {"cells": {}}

    def current_key(key: str, cell: dict) -> str:
        try:
            base = cell.get("base", UNRECORDED_BASE)
            return cell_key(cell["settings"], cell["seed"], base) if "settings" in cell else key
        except ValueError:  # settings this version no longer has: the cell stays, under its stored key
            return key

    results["cells"] = {current_key(key, c): c for key, c in results["cells"].items()}
    return results


def checkpoint_neighbor_precision(checkpoint: Path, budget: Budget, seed: int) -> float | None:
    """Share of the top-k neighbours (one random crop of every pretraining image) that share a class with
    their query crop, as ``benchmarks/demo_precision.py`` measures it; ``None`` without labels."""
    opened = open_pretrained(str(checkpoint))
    model, source, size = opened.model, opened.source, opened.image_size
    if source.multi_hot() is None:
        return None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        queries = torch.randperm(len(source))[:budget.queries].tolist()
        bank = dataset_bank(model.backbone_q, source, size, list(range(len(source))))
        found = search(model.backbone_q, source, bank, queries, budget.k, size)
    return neighbor_precision(found)


def probe_scores(checkpoint: Path, probe, image_size: int, budget: Budget, seed: int, workers: int) -> dict:
    """Linear-probe mAP and k-NN mAP of the frozen backbone on one (train, test) split."""
    info = backbone_info(str(checkpoint))
    task = Task(str(checkpoint), info["arch"], info["small_stem"], probe, image_size, 256, workers)
    linear = classification_metrics(*linear_probe(task, seed, epochs=budget.probe_epochs), True)
    votes = classification_metrics(*knn_classify(task, seed), True)
    return {"map": linear["mAP"], "knn_map": votes["mAP"]}


def score(checkpoint: Path, budget: Budget, seed: int, test: bool, workers: int) -> dict:
    """Every score of one pretrained cell: validation (and with ``test``, test) probes, neighbour precision."""
    info = backbone_info(str(checkpoint))
    size = info["image_size"] or 224
    data = load_dataset("synthetic", image_size=size, num_images=budget.probe_images) if budget.probe_data is None \
        else load_dataset("voc07", budget.probe_data)
    scores = {f"val_{k}": v for k, v in probe_scores(checkpoint, validation_split(data), size, budget, seed,
                                                     workers).items()}
    if test:
        scores.update({f"test_{k}": v for k, v in probe_scores(checkpoint, data, size, budget, seed, workers).items()})
    scores["precision"] = checkpoint_neighbor_precision(checkpoint, budget, seed)
    return scores


def _final_losses(run: Path) -> dict:
    """The last logged loss terms of a run (its CSV logs, every resumed part joined)."""
    from mls.viz.curves import find_metrics, read_metrics

    series = read_metrics(*find_metrics(run / "csv"))
    names = ("train/loss", "train/loss_infonce", "train/loss_extra", "train/label_precision")
    return {name.removeprefix("train/"): series[name][-1][1] for name in names if series.get(name)}


def study_command(grid: str, seeds: int, budget: str, data: str | None, only: list[str] | None, test: bool,
                  base: str = "demo") -> str:
    """The ``mls study`` command line of these options, as printed above the table (one the CLI takes)."""
    return f"mls study --grid {grid} --seeds {seeds} --budget {budget}" + (f" --data {data}" if data else "") + \
        (f" --base {base}" if base != "demo" else "") + (f" --only '[{','.join(only)}]'" if only else "") + \
        (" --test true" if test else "")


def elapsed_and_left(started: float, done: int, total: int) -> str:
    """Minutes since ``started`` and, once ``done`` of ``total`` runs are done, the minutes the rest take at that pace."""
    elapsed = time.monotonic() - started
    left = elapsed / done * (total - done) if done else None
    return f"elapsed {elapsed / 60:.1f} min" + (f", about {left / 60:.0f} min left" if left is not None else "")


@dataclasses.dataclass
class GridRun:
    """One ``mls study`` call on its cells: which are finished, scoring again, pretraining, and saving results.

    ``cells`` maps a variant to its option overrides, ``settings`` to the options its cells pretrain with,
    ``index`` to its cell key by seed; ``results`` is results.json's content under ``root``; ``base`` is the
    cells' base on the built-in scenes (``None`` with data).
    """

    root: Path
    results: dict
    plan: Budget
    cells: dict[str, dict]
    settings: dict[str, dict]
    index: dict[str, dict[int, str]]
    test: bool
    rescore: bool
    workers: int
    base: str | None
    progress: str = "auto"  # how each cell's pretraining shows its progress (mls.progress)

    def save(self) -> str:
        """Write results.json, then results.md and results.png; return the table."""
        atomic_write(self.root / "results.json",
                     lambda tmp: Path(tmp).write_text(json.dumps(self.results, indent=2) + "\n"))
        return write_outputs(self.root, self.results, self.cells, self.index)

    def finished(self, key: str) -> bool:
        """The cell is scored (with ``test``: on the test split too)."""
        previous = self.results["cells"].get(key)
        return bool(previous) and (not self.test or "test_map" in previous["scores"])

    def skipped(self, key: str) -> bool:
        """Not pretrained by this call: finished, or scored again from its checkpoint under ``rescore``."""
        return self.finished(key) or (self.rescore and key in self.results["cells"])

    def rescore_cell(self, key: str, seed: int, label: str) -> None:
        """Score a finished cell again from its last.ckpt (on the test split too if it was or ``test`` asks)."""
        previous = self.results["cells"][key]
        checkpoint = last_checkpoint(Path(previous["run"]))
        print(f"{label}: scoring {checkpoint} again", flush=True)
        previous["scores"] = score(checkpoint, self.plan, seed, self.test or "test_map" in previous["scores"],
                                   self.workers)
        self.save()

    def pretrain_cell(self, variant: str, seed: int) -> None:
        """Pretrain one cell (going on from its checkpoint if interrupted), score it and save the results."""
        options, key = self.settings[variant], self.index[variant][seed]
        run_dir = self.root / "cells" / f"{variant}-{key[:8]}"
        # a cell is scored from last.ckpt alone: no per-epoch checkpoints (a grid of them fills a disk), and no
        # --monitor pass or best.ckpt (the study's own probes score it)
        checkpoint = pretrain(out=str(run_dir), resume="auto", preset=cell_preset(options), seed=seed,
                              **{"save_every": 0, "monitor_every": 0, "progress": self.progress, **options})
        # stored with its preset's values written out: a later change of the preset leaves the cell's meaning
        frozen = {**PRESETS[cell_preset(options)], **options}
        self.results["cells"][key] = {"variant": variant, "seed": seed, "options": self.cells[variant],
                                      "settings": frozen, "base": self.base, "run": str(run_dir),
                                      "scores": score(checkpoint, self.plan, seed, self.test, self.workers),
                                      "final": _final_losses(run_dir)}
        self.save()

    def run(self, seeds: int) -> None:
        """Every cell, seed by seed (so that partial results pair up): pretrained unless finished, or
        scored again under ``rescore``; the progress counts only the cells this call pretrains."""
        todo = [(seed, variant) for seed in range(seeds) for variant in self.cells]
        # the cells this call pretrains: variants of equal settings share one
        to_run = {self.index[variant][seed] for seed, variant in todo if not self.skipped(self.index[variant][seed])}
        started, done_here, rescored = time.monotonic(), 0, set()
        for number, (seed, variant) in enumerate(todo, start=1):
            key, label = self.index[variant][seed], f"[{number}/{len(todo)}] {variant}, seed {seed}"
            if self.results["cells"].get(key) and self.rescore:
                if key not in rescored:
                    self.rescore_cell(key, seed, label)
                    rescored.add(key)
            elif not self.finished(key):
                print(f"{label}: run {done_here + 1} of {len(to_run)}, " + elapsed_and_left(started, done_here, len(to_run)),
                      flush=True)
                self.pretrain_cell(variant, seed)
                done_here += 1


def study(grid: str = "table6", seeds: int = 3, budget: str = "demo", data: str | None = None,
          base: SceneBase = "demo", out: str = "runs/study", only: list[str] | None = None, test: bool = False,
          rescore: bool = False, workers: int = 2, progress: Progress = "auto") -> dict:
    """Run a grid of pretrainings over several seeds, score each, and report mean ± std and paired differences.

    Args:
        grid: table6 (MoCo-v2, +k-NN softmax, +BCE-pos, +BCE), table7 (both queues / Q_g only / Q_z only),
            table8 (k = 1, 5, 20, 40), queue (Fig. 5a), lambda (Fig. 5b), balance (ways of weighting the
            extra loss), or a YAML file mapping variant names to option overrides. Every grid also runs
            the MoCo-v2 baseline and the paper's own setting.
        seeds: pretraining seeds per variant (0, 1, ...).
        budget: tiny (a few steps, for tests), demo (the CPU demo's 8 epochs), long (4x the demo), or a YAML file
            with ``pretrain`` options and the probe's settings (probe_images, probe_epochs, queries, k).
        data: image folder to pretrain on (default: the built-in scenes).
        base: the MLS the variants change on the built-in scenes: demo (the demo as it ships, what
            ``mls pretrain`` runs without --data) or demo-0.4 (the demo of mls 0.4 to 0.5.0, at λ = 1, which the
            tables in docs/study measured). With --data the base is the paper's preset.
        out: folder of the cells' runs and of results.json, results.md and results.png.
        only: run only these variants (and MoCo-v2).
        test: also score the test split (do this once, for the finalists: settings are chosen on validation).
        rescore: score finished cells again from their checkpoints (after a change to the scoring), without
            pretraining them again.
        workers: data-loading processes of the probes.
        progress: how each pretraining shows its progress: bar, lines (a plain line every 30 s and at each
            epoch's end, for a log file), off, or auto (bar on a terminal, else lines).
    """
    if seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {seeds}")
    plan = load_budget(budget)
    cells = grid_cells(grid, plan, data, only, base)
    scene = base if on_scenes({"data": data}) else None  # with data: no scene base
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    results = load_results(root / "results.json")
    results.update(command=study_command(grid, seeds, budget, data, only, test, base), grid=grid, budget=budget,
                   base=scene, budget_settings=dataclasses.asdict(plan))
    settings = {variant: cell_options({**plan.pretrain, "data": data, **options}, scene)
                for variant, options in cells.items()}
    index = {variant: {seed: cell_key(settings[variant], seed, scene) for seed in range(seeds)} for variant in cells}
    grid_run = GridRun(root, results, plan, cells, settings, index, test, rescore, workers, scene, progress)
    grid_run.run(seeds)
    table = grid_run.save()  # also when nothing ran: results.json then names this call's grid and command
    print(table)
    return results
