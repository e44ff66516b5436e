"""A labelled score while pretraining (``--monitor``): every ``monitor_every`` epochs, the weighted k-NN score of the
query backbone's pooled features on a fixed sample of the user's labelled images, as ``mls eval knn`` computes it
(``mls.eval.probes.knn_scores``, k = 20, cosine, votes exp(cos / 0.07)). One part of the sample is the k-NN bank,
the other the queries it classifies; the score is their top-1 accuracy (single-label, ``monitor/knn_top1``) or
mAP (multi-label, ``monitor/knn_map``), in %. ``ModelCheckpoint`` keeps the best checkpoint by it (``best.ckpt``).

It is computed on rank zero, whose weights and BatchNorm statistics are those every checkpoint holds (DDP here does
not broadcast buffers, so other ranks' statistics differ), and summed with the other ranks' zeros, so that every
rank logs the same value and every rank's ``ModelCheckpoint`` decides alike. The pass leaves the training as it
was: the random state, the backbone's mode and its BatchNorm statistics are untouched.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms as T
from torchvision.datasets.folder import find_classes

from mls.eval.datasets import Transformed, coco_labels, load_dataset
from mls.eval.metrics import average_precision, top1_accuracy
from mls.eval.probes import knn_scores
from mls.eval.settings import KnnProtocol
from mls.eval.transforms import centre_crop
from mls.method.backbones import IMAGENET_MEAN, IMAGENET_STD
from mls.train.resume import CHECKPOINTS

SCENES = "scenes"
SCENES_SEED = 2**31 - 1  # the built-in scenes the monitor reads: held out from runs, whose seeds are small
SAMPLE_SEED = 0  # the sample of a larger labelled set: the same images for every run, whatever its seed
BEST = "best"
LAYOUTS = ("scenes (the built-in scenes, held out from training), a folder of class folders (DIR/<class>/<image>), "
           "a folder holding VOCdevkit/VOC2007, or a COCO instances_NAME.json (images in ../NAME/)")


@dataclass
class MonitorSet:
    """A fixed sample of labelled images: the first ``queries`` of ``indices`` are the queries, the rest the bank."""

    dataset: Dataset  # (PIL image, target): a class index, or a multi-hot vector
    indices: list[int]
    queries: int
    classes: list[str]
    multilabel: bool
    name: str

    @property
    def metric(self) -> str:
        return "monitor/knn_map" if self.multilabel else "monitor/knn_top1"

    def describe(self) -> str:
        """"k-NN mAP on 256 images of the built-in scenes (128 queries)"."""
        kind = "mAP" if self.multilabel else "top-1"
        return f"k-NN {kind} on {len(self.indices):,} images of {self.name} ({self.queries:,} queries)"

    def decode(self, image_size: int, batch_size: int, workers: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The sample's centre crops at ``image_size`` (N x 3 x S x S uint8, as ``mls eval`` crops) and targets."""
        crop = T.Compose([centre_crop(image_size), T.PILToTensor()])
        sample = Transformed(Subset(self.dataset, self.indices), crop)
        try:
            images, targets = zip(*DataLoader(sample, batch_size=batch_size, num_workers=workers))
        except (OSError, ValueError) as error:  # from a loader process: its message is a traceback; find the image
            raise ValueError(f"--monitor {self.name}: {self._unreadable(sample) or error}") from None
        return torch.cat(images), torch.cat(targets)

    @staticmethod
    def _unreadable(sample: Dataset) -> str | None:
        """The first image of ``sample`` that cannot be read, said in one line (None if all can)."""
        for i in range(len(sample)):
            try:
                sample[i]
            except (OSError, ValueError) as error:
                return f"image {i} of the sample cannot be read ({str(error).splitlines()[0]}); remove or replace it"
        return None


def _class_folders(path: Path) -> tuple[Dataset, list[str]]:
    """An image folder of class folders, with at least two classes."""
    try:
        classes, _ = find_classes(str(path))
    except FileNotFoundError as error:
        raise FileNotFoundError(f"--monitor {path} holds no class folders; expected {LAYOUTS}") from error
    if len(classes) < 2:
        raise ValueError(f"--monitor {path} holds one class folder ({classes[0]}): a k-NN score needs images of at "
                         "least two classes")
    return torchvision.datasets.ImageFolder(str(path)), classes


def _labelled(spec: str, image_size: int, count: int) -> tuple[Dataset, list[str], bool, str]:
    """The labelled images ``--monitor`` names, read as ``mls eval`` reads them (its training split where a layout
    has two: the user's test split is left alone), their classes, whether multi-label, and a name."""
    if spec == SCENES:
        from mls.data.synthetic import CLASSES, SyntheticScenes

        return SyntheticScenes(count, image_size, SCENES_SEED), list(CLASSES), True, "the built-in scenes"
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--monitor {path} does not exist; expected {LAYOUTS}")
    if path.is_file():
        images = path.parent.parent / path.stem.removeprefix("instances_")
        if not images.is_dir():
            raise FileNotFoundError(f"--monitor {path}: its images are expected in {images}, which is not a folder")
        data, classes = coco_labels(path, images)
        return data, classes, True, path.name
    if (path / "VOCdevkit").is_dir():
        voc = load_dataset("voc07", str(path))
        return voc.train, voc.classes, True, f"{path} (VOC2007 trainval)"
    data, classes = _class_folders(path)
    return data, classes, False, str(path)


def open_monitor(spec: str, image_size: int, count: int, split: float) -> MonitorSet:
    """The fixed sample the monitor scores on: at most ``count`` images of ``spec`` (``LAYOUTS``), a ``split``
    share of them queries. Refuses, in plain words, data it cannot score (missing, unlabelled, one class)."""
    dataset, classes, multilabel, name = _labelled(spec, image_size, count)
    if len(classes) < 2:
        raise ValueError(f"--monitor {spec} has {len(classes)} class(es): a k-NN score needs at least two")
    if len(dataset) < 2:
        raise ValueError(f"--monitor {spec} holds {len(dataset)} labelled images: the bank and the queries need "
                         "at least one each")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(SAMPLE_SEED))
    indices = order[:count].tolist()
    queries = min(max(1, round(split * len(indices))), len(indices) - 1)
    return MonitorSet(dataset, indices, queries, classes, multilabel, name)


@torch.no_grad()
def backbone_features(backbone: nn.Module, images: torch.Tensor, device: torch.device,
                      batch_size: int) -> torch.Tensor:
    """Pooled features (N x d, float, on ``device``) of uint8 images, ImageNet-normalised, in eval mode; the
    backbone's mode is restored after."""
    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    training = backbone.training
    backbone.eval()
    try:
        return torch.cat([backbone(normalize(batch.to(device).float() / 255)).flatten(1).float()
                          for batch in images.split(batch_size)])
    finally:
        backbone.train(training)


def knn_score(features: torch.Tensor, targets: torch.Tensor, queries: int, num_classes: int,
              multilabel: bool) -> float:
    """Weighted k-NN (``mls eval knn``'s k and temperature) of the first ``queries`` rows by the others: top-1
    accuracy, or mAP (area under the precision-recall curve, as ``mls eval``), in %."""
    knn = KnnProtocol()
    targets = targets.to(features.device)
    votes = knn_scores(features[queries:], targets[queries:], features[:queries], num_classes, multilabel,
                       knn.k, knn.temperature)
    if multilabel:
        return 100 * average_precision(votes.cpu(), targets[:queries].cpu()).nanmean().item()
    return 100 * top1_accuracy(votes.cpu(), targets[:queries].cpu())


class LabelMonitor(Callback):
    """Every ``every`` epochs (counted from the first), the k-NN score of the query backbone on ``labelled``,
    logged as ``labelled.metric``; ``seconds`` and ``passes`` say what it cost. The images are decoded at the
    first pass (by ``workers`` processes) and kept in memory as uint8."""

    def __init__(self, labelled: MonitorSet, every: int, image_size: int, batch_size: int, workers: int):
        self.labelled, self.every, self.image_size = labelled, every, image_size
        self.batch_size, self.workers = batch_size, workers
        self._images: tuple[torch.Tensor, torch.Tensor] | None = None
        self.passes, self.seconds, self.run_seconds = 0, 0.0, 0.0
        self._started = time.perf_counter()

    def on_train_start(self, trainer, pl_module) -> None:
        self._started = time.perf_counter()
        if trainer.is_global_zero:  # now: an unreadable image stops the run before it trains, not an epoch later
            self.images(pl_module.device)

    def on_train_end(self, trainer, pl_module) -> None:
        self.run_seconds = time.perf_counter() - self._started

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if (trainer.current_epoch + 1) % self.every:
            return
        start = time.perf_counter()
        score = self.score(pl_module.model.backbone_q, pl_module.device) if trainer.is_global_zero else 0.0
        # rank zero's score, to which the other ranks add 0: the same value on every rank
        pl_module.log(self.labelled.metric, score, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True,
                      reduce_fx="sum")
        self.seconds += time.perf_counter() - start
        self.passes += 1

    def images(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The sample's images and targets, decoded at the first call; the random state (which a data loader
        draws from) is restored after."""
        if self._images is None:
            start = time.perf_counter()
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                self._images = self.labelled.decode(self.image_size, self.batch_size, self.workers)
            self.seconds += time.perf_counter() - start
        return self._images

    def score(self, backbone: nn.Module, device: torch.device) -> float:
        """The score of ``backbone`` now."""
        images, targets = self.images(device)
        features = backbone_features(backbone, images, device, self.batch_size)
        return knn_score(features, targets, self.labelled.queries, len(self.labelled.classes),
                         self.labelled.multilabel)


def monitor_callbacks(labelled: MonitorSet, every: int, image_size: int, batch_size: int, workers: int,
                      out: Path) -> list[Callback]:
    """The monitor and the ``ModelCheckpoint`` that keeps the checkpoint of its best score as ``best.ckpt``
    (beside ``last.ckpt``; ``--resume auto`` goes on from the furthest checkpoint, never from this one)."""
    best = ModelCheckpoint(out / CHECKPOINTS, filename=BEST, monitor=labelled.metric, mode="max", save_top_k=1,
                           every_n_epochs=every, auto_insert_metric_name=False)
    return [LabelMonitor(labelled, every, image_size, batch_size, workers), best]
