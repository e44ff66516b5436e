"""``mls eval {linear,finetune,knn}``: the classification protocols, repeated over seeds and reported.

The three commands share their data, weights and run options through ``evaluate``; each adds
only its own options.
"""
from __future__ import annotations

import os
from functools import partial

import torch

from mls.checkpoints.pretrained import backbone_info
from mls.eval import finetune as finetuning
from mls.eval.datasets import DATASETS, load_dataset
from mls.eval.metrics import average_precision, classification_metrics
from mls.eval.probes import Task, knn_classify, linear_probe
from mls.eval.results import summarise, write_report

FEATURE_BATCH = 256  # batch of feature extraction and of the linear probe when --batch-size is not given
SYNTHETIC_SIZE = 64  # size of the generated images when neither --image-size nor the checkpoint gives one
MAX_WORKERS = 4  # data-loading processes by default: the machine's cores, at most this many


def evaluate(name: str, protocol, settings: dict, default_batch: int, weights: str = "random",
             dataset: str = "synthetic", data: str | None = None, runs: int = 2, batch_size: int | None = None,
             image_size: int | None = None, arch: str | None = None, small_stem: bool | None = None,
             workers: int | None = None, out: str | None = None, seed: int = 0, synthetic_images: int = 512) -> dict:
    """Run ``protocol(task, seed)`` for seeds seed..seed+runs-1, then write and print mean and std of its metrics.

    Args:
        name: the protocol's name in the report.
        protocol: a function (task, seed) -> (test scores, test targets).
        settings: the protocol's own options, recorded in results.json.
        default_batch: batch size when --batch-size is not given.
        weights: pretraining checkpoint (.ckpt), exported torchvision backbone (.pth/.pt), or "random".
        dataset: one of voc07, cub200, flowers102, cars, aircraft, pets, dtd, indoor67, imagefolder, coco,
            synthetic (layouts in mls.eval.datasets).
        data: folder holding the data set in its official layout (not needed for synthetic).
        runs: repetitions with seeds seed, seed+1, ...; the report gives their mean and std.
        batch_size: batch size (default: 256 for features, the data set's recipe for fine-tuning).
        image_size: input resolution (default: 224, or the pretraining size for synthetic data).
        arch: backbone architecture (default: from the checkpoint, else resnet50).
        small_stem: 3x3 stem for small images (default: from the checkpoint, else false).
        workers: data-loading processes (default: the machine's cores, at most 4).
        out: folder for results.json and results.md (default: runs/eval/DATASET-PROTOCOL).
        seed: seed of the first run.
        synthetic_images: number of generated training images of the synthetic task (test: half as many).
    """
    if dataset not in DATASETS:
        raise ValueError(f"--dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    if runs < 1:
        raise ValueError(f"--runs must be at least 1, got {runs}")
    info = backbone_info(weights, arch=arch, small_stem=small_stem)
    recipe = finetuning.RECIPES[dataset]
    size = image_size or recipe.image_size or info.get("image_size") or SYNTHETIC_SIZE
    task = Task(weights, info["arch"], info["small_stem"], load_dataset(dataset, data, size, synthetic_images),
                size, batch_size or default_batch, min(MAX_WORKERS, os.cpu_count() or 1) if workers is None else workers)
    seeds = [seed + r for r in range(runs)]
    outputs = [protocol(task, s) for s in seeds]
    per_run = [classification_metrics(*o, task.data.multilabel, voc07=dataset == "voc07") for o in outputs]
    result = {"dataset": dataset, "protocol": name, "weights": weights, "runs": runs, "seeds": seeds,
              "arch": task.arch, "small_stem": task.small_stem, "image_size": size, "batch_size": task.batch_size,
              "settings": settings, "metrics": summarise(per_run)}
    if task.data.multilabel:  # which classes a backbone serves well: the area AP of each, averaged over runs
        per_class = torch.stack([average_precision(*o) for o in outputs]).mean(0)
        result["per_class_ap"] = {c: 100 * ap for c, ap in zip(task.data.classes, per_class.tolist())}
    print(write_report(out or f"runs/eval/{dataset}-{name}", result))
    return result


def linear(epochs: int = 100, lr: float = 0.1, weight_decay: float = 0.0, **kwargs) -> dict:
    """Linear probe: a linear layer trained on frozen, standardised backbone features (extracted once).

    Args:
        epochs: epochs of the linear layer over the cached features.
        lr: initial learning rate (SGD, momentum 0.9, cosine).
        weight_decay: weight decay of the linear layer.
    """
    settings = {"epochs": epochs, "lr": lr, "weight_decay": weight_decay}
    return evaluate("linear", partial(linear_probe, **settings), settings, FEATURE_BATCH, **kwargs)


def finetune(epochs: int | None = None, lr: float | None = None, weight_decay: float | None = None,
             precision: str = "32-true", **kwargs) -> dict:
    """Full fine-tuning of every layer with a new linear head (recipes per data set in mls.eval.finetune).

    Args:
        epochs: training epochs (default: the data set's recipe).
        lr: initial learning rate, SGD momentum 0.9, cosine (default: the data set's recipe).
        weight_decay: weight decay (default: the data set's recipe).
        precision: Lightning precision, e.g. 32-true, 16-mixed, bf16-mixed.
    """
    recipe = finetuning.recipe_for(kwargs.get("dataset", "synthetic"), epochs=epochs, lr=lr, weight_decay=weight_decay)
    settings = {"epochs": recipe.epochs, "lr": recipe.lr, "weight_decay": recipe.weight_decay, "precision": precision}
    protocol = partial(finetuning.finetune_model, **settings)
    return evaluate("finetune", protocol, settings, recipe.batch_size, **kwargs)


def knn(k: int = 20, temperature: float = 0.07, **kwargs) -> dict:
    """Weighted k-NN on L2-normalised frozen features (InstDisc voting; per-class votes for multi-label).

    Args:
        k: number of neighbours.
        temperature: temperature of the exp(cosine / temperature) vote weights.
    """
    settings = {"k": k, "temperature": temperature}
    return evaluate("knn", partial(knn_classify, **settings), settings, FEATURE_BATCH, **kwargs)
