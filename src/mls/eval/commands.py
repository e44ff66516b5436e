"""``mls eval {linear,finetune,knn}``: the classification protocols, repeated over seeds and reported.

The three commands share their data, weights and run options (``EvalRun``) through ``evaluate``; each adds
only its own protocol's. Every option is a documented field of a settings dataclass (``mls.eval.settings``):
the command's signature, its ``--help`` and its keywords in Python are built from them.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path

import torch

from mls.checkpoints.pretrained import backbone_info
from mls.command_options import CommandSettings
from mls.eval import finetune as finetuning
from mls.eval.datasets import load_dataset
from mls.eval.metrics import average_precision, classification_metrics
from mls.eval.probes import Task, knn_classify, linear_probe
from mls.eval.results import summarise, write_report
from mls.eval.settings import EvalRun, FinetuneOutput, FinetuneProtocol, KnnProtocol, LinearProtocol
from mls.loggers import build_loggers

FEATURE_BATCH = 256  # batch of feature extraction and of the linear probe when --batch-size is not given
SYNTHETIC_SIZE = 64  # size of the generated images when neither --image-size nor the checkpoint gives one

LINEAR = CommandSettings((LinearProtocol, EvalRun))
FINETUNE = CommandSettings((FinetuneProtocol, EvalRun, FinetuneOutput))
KNN = CommandSettings((KnnProtocol, EvalRun))


def evaluate(name: str, protocol, settings: dict, default_batch: int, run: EvalRun) -> dict:
    """Run ``protocol(task, seed)`` for seeds seed..seed+runs-1, then write and print mean and std of its metrics.

    Args:
        name: the protocol's name in the report.
        protocol: a function (task, seed) -> (test scores, test targets).
        settings: the protocol's own options, recorded in results.json.
        default_batch: batch size when --batch-size is not given.
        run: the weights, data, repetitions, loading and output (``EvalRun``).
    """
    info = backbone_info(run.weights, arch=run.arch, small_stem=run.small_stem)
    recipe = finetuning.RECIPES[run.dataset]
    size = run.image_size or recipe.image_size or info.get("image_size") or SYNTHETIC_SIZE
    task = Task(run.weights, info["arch"], info["small_stem"],
                load_dataset(run.dataset, run.data, size, run.synthetic_images), size,
                run.batch_size or default_batch, run.loader_workers)
    seeds = [run.seed + r for r in range(run.runs)]
    outputs = [protocol(task, s) for s in seeds]
    per_run = [classification_metrics(*o, task.data.multilabel, voc07=run.dataset == "voc07") for o in outputs]
    result = {"dataset": run.dataset, "protocol": name, "weights": run.weights, "runs": run.runs, "seeds": seeds,
              "arch": task.arch, "small_stem": task.small_stem, "image_size": size, "batch_size": task.batch_size,
              "settings": settings, "metrics": summarise(per_run)}
    if task.data.multilabel:  # which classes a backbone serves well: the area AP of each, averaged over runs
        per_class = torch.stack([average_precision(*o) for o in outputs]).mean(0)
        result["per_class_ap"] = {c: 100 * ap for c, ap in zip(task.data.classes, per_class.tolist())}
    print(write_report(run.folder(name), result))
    return result


@LINEAR.options
def linear(**options) -> dict:
    """Linear probe: a linear layer trained on frozen, standardised backbone features (extracted once)."""
    probe, run = LINEAR.settings(options)
    settings = dataclasses.asdict(probe)
    return evaluate("linear", partial(linear_probe, **settings), settings, FEATURE_BATCH, run)


@FINETUNE.options
def finetune(**options) -> dict:
    """Full fine-tuning of every layer with a new linear head (recipes per data set in mls.eval.finetune)."""
    given, run, output = FINETUNE.settings(options)
    recipe = finetuning.recipe_for(run.dataset, epochs=given.epochs, lr=given.lr, weight_decay=given.weight_decay)
    settings = {"epochs": recipe.epochs, "lr": recipe.lr, "weight_decay": recipe.weight_decay,
                "precision": given.precision}

    def loggers(folder: Path, seed: int) -> list:  # each run's logs in its folder, with the settings it ran with
        return build_loggers(output.logger, folder, output.project, output.run_name,
                             {**settings, **dataclasses.asdict(run), "seed": seed}, repetition=True)

    protocol = partial(finetuning.finetune_model, **settings, runs_in=Path(run.folder("finetune")),
                       first_seed=run.seed, save_every=given.save_every, resume=given.resume,
                       loggers=loggers, progress=output.progress)
    return evaluate("finetune", protocol, settings, recipe.batch_size, run)


@KNN.options
def knn(**options) -> dict:
    """Weighted k-NN on L2-normalised frozen features (InstDisc voting; per-class votes for multi-label)."""
    vote, run = KNN.settings(options)
    settings = dataclasses.asdict(vote)
    return evaluate("knn", partial(knn_classify, **settings), settings, FEATURE_BATCH, run)
