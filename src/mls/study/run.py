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

from mls.checkpoint import backbone_info, load_pretrained
from mls.eval.datasets import load_dataset, validation_split
from mls.eval.metrics import classification_metrics
from mls.eval.protocols import Task, knn, linear_probe
from mls.files import atomic_write
from mls.study.grids import Budget, cell_options, cell_preset, grid_cells, load_budget, resolve_cell
from mls.study.report import write_outputs
from mls.train import pretrain
from mls.viz.neighbors import checkpoint_data, dataset_bank, precision, search

# settings that do not change what a run learns (views are drawn per seed, epoch and image, whatever the workers)
BOOKKEEPING = ("save_every", "log_every", "workers")


def cell_key(options: dict, seed: int) -> str:
    """A short stable name for the settings a cell resolves to (every setting, defaults included) and its seed:
    two ways of writing the same run share a key, and a run under other defaults does not."""
    resolved = resolve_cell({**options, "seed": seed})
    settings = {name: value for name, value in resolved.values().items() if name not in BOOKKEEPING}
    settings["augment_on"] = resolved.train.views_on  # auto is cpu here and device on a GPU machine
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def load_results(path: Path) -> dict:
    """results.json with every cell under the key of its settings as this version computes it, so that a
    change to what a key covers never runs a finished cell again."""
    results = json.loads(path.read_text()) if path.is_file() else {"cells": {}}

    def current_key(key: str, cell: dict) -> str:
        try:
            return cell_key(cell["settings"], cell["seed"]) if "settings" in cell else key
        except ValueError:  # settings this version no longer has: the cell stays, under its stored key
            return key

    results["cells"] = {current_key(key, c): c for key, c in results["cells"].items()}
    return results


def neighbour_precision(checkpoint: Path, budget: Budget, seed: int) -> float | None:
    """Share of the top-k neighbours (one random crop of every pretraining image) that share a class with
    their query crop, as ``benchmarks/demo_precision.py`` measures it; ``None`` without labels."""
    model, info = load_pretrained(checkpoint)
    source, data_args = checkpoint_data(info, str(checkpoint))
    if source.multi_hot() is None:
        return None
    size = data_args.get("image_size") or 224
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        queries = torch.randperm(len(source))[:budget.queries].tolist()
        bank = dataset_bank(model.backbone_q, source, size, list(range(len(source))))
        found = search(model.backbone_q, source, bank, queries, budget.k, size)
    return precision(found)


def probe_scores(checkpoint: Path, probe, image_size: int, budget: Budget, seed: int, workers: int) -> dict:
    """Linear-probe mAP and k-NN mAP of the frozen backbone on one (train, test) split."""
    info = backbone_info(str(checkpoint))
    task = Task(str(checkpoint), info["arch"], info["small_stem"], probe, image_size, 256, workers)
    linear = classification_metrics(*linear_probe(task, seed, epochs=budget.probe_epochs), True)
    votes = classification_metrics(*knn(task, seed), True)
    return {"map": linear["mAP"], "knn_map": votes["mAP"]}


def score(checkpoint: Path, budget: Budget, seed: int, test: bool, workers: int) -> dict:
    """Every score of one pretrained cell: validation (and with ``test``, test) probes, neighbour precision."""
    info = backbone_info(str(checkpoint))
    size = info["image_size"] or 224
    data = load_dataset("synthetic", image_size=size, num_images=budget.probe_images)
    scores = {f"val_{k}": v for k, v in probe_scores(checkpoint, validation_split(data), size, budget, seed,
                                                     workers).items()}
    if test:
        scores.update({f"test_{k}": v for k, v in probe_scores(checkpoint, data, size, budget, seed, workers).items()})
    scores["precision"] = neighbour_precision(checkpoint, budget, seed)
    return scores


def _final_losses(run: Path) -> dict:
    """The last logged loss terms of a run (its CSV logs, every resumed part joined)."""
    from mls.viz.curves import find_metrics, read_metrics

    series = read_metrics(*find_metrics(run / "csv"))
    names = ("train/loss", "train/loss_infonce", "train/loss_extra", "train/label_precision")
    return {name.removeprefix("train/"): series[name][-1][1] for name in names if series.get(name)}


def study(grid: str = "table6", seeds: int = 3, budget: str = "demo", data: str | None = None,
          out: str = "runs/study", only: list[str] | None = None, test: bool = False, rescore: bool = False,
          workers: int = 2) -> dict:
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
        out: folder of the cells' runs and of results.json, results.md and results.png.
        only: run only these variants (and MoCo-v2).
        test: also score the test split (do this once, for the finalists: settings are chosen on validation).
        rescore: score finished cells again from their checkpoints (after a change to the scoring), without
            pretraining them again.
        workers: data-loading processes of the probes.
    """
    if seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {seeds}")
    plan = load_budget(budget)
    cells = grid_cells(grid, plan, data, only)
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    results_path = root / "results.json"
    results = load_results(results_path)
    command = f"mls study --grid {grid} --seeds {seeds} --budget {budget}" + (f" --data {data}" if data else "") + \
        (f" --only '[{','.join(only)}]'" if only else "") + (" --test true" if test else "")
    results.update(command=command, grid=grid, budget=budget, budget_settings=dataclasses.asdict(plan))

    todo = [(seed, variant) for seed in range(seeds) for variant in cells]  # seed by seed: partial results pair up
    settings = {variant: cell_options({**plan.pretrain, "data": data, **options}) for variant, options in cells.items()}
    index = {variant: {seed: cell_key(settings[variant], seed) for seed in range(seeds)} for variant in cells}

    def save() -> str:
        atomic_write(results_path, lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2) + "\n"))
        return write_outputs(root, results, cells, index)

    def finished(key: str) -> bool:
        previous = results["cells"].get(key)
        return bool(previous) and (not test or "test_map" in previous["scores"])

    def skipped(key: str) -> bool:  # finished, or scored again from its checkpoint under --rescore
        return finished(key) or (rescore and key in results["cells"])

    # the cells this call pretrains: variants of equal settings share one
    to_run = {index[variant][seed] for seed, variant in todo if not skipped(index[variant][seed])}
    started, done_here, rescored = time.monotonic(), 0, set()
    for number, (seed, variant) in enumerate(todo, start=1):
        options, key = settings[variant], index[variant][seed]
        previous = results["cells"].get(key)
        if previous and rescore:
            if key not in rescored:
                checkpoint = Path(previous["run"]) / "checkpoints" / "last.ckpt"
                print(f"[{number}/{len(todo)}] {variant}, seed {seed}: scoring {checkpoint} again", flush=True)
                previous["scores"] = score(checkpoint, plan, seed, test or "test_map" in previous["scores"], workers)
                rescored.add(key)
                save()
            continue
        if finished(key):
            continue
        elapsed = time.monotonic() - started
        left = elapsed / done_here * (len(to_run) - done_here) if done_here else None
        print(f"[{number}/{len(todo)}] {variant}, seed {seed}: run {done_here + 1} of {len(to_run)}, "
              f"elapsed {elapsed / 60:.1f} min" + (f", about {left / 60:.0f} min left" if left is not None else ""),
              flush=True)
        run_dir = root / "cells" / f"{variant}-{key[:8]}"
        # a cell is scored from last.ckpt alone: no per-epoch checkpoints (a grid of them fills a disk)
        checkpoint = pretrain(out=str(run_dir), resume="auto", preset=cell_preset(options), seed=seed,
                              **{"save_every": 0, **options})
        results["cells"][key] = {"variant": variant, "seed": seed, "options": cells[variant], "settings": options,
                                 "run": str(run_dir), "scores": score(checkpoint, plan, seed, test, workers),
                                 "final": _final_losses(run_dir)}
        done_here += 1
        save()
    table = save()  # also when nothing ran: results.json then names this call's grid and command
    print(table)
    return results
