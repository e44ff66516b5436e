"""The labelled score while pretraining (``--monitor``): the k-NN score against a brute-force vote and
scikit-learn, what it reads, that it leaves the training alone, its logs, best checkpoint and summary line, and
its refusals."""
import csv
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from sklearn.metrics import average_precision_score

from conftest import TINY
from mls.checkpoints.pretrained import load_pretrained, read_checkpoint
from mls.cli import console
from mls.data.synthetic import write_coco, write_voc
from mls.eval.datasets import Transformed
from mls.eval.features import extract_features
from mls.eval.probes import knn_scores
from mls.eval.transforms import test_transform as eval_crop
from mls.study.runner import cell_key
from mls.train import pretrain
from mls.train.monitor import SCENES, LabelMonitor, knn_score, open_monitor
from mls.train.resume import resolve_resume
from mls.viz.curves import plot_curves

K, TEMPERATURE = 20, 0.07  # mls eval knn's


def brute_force_votes(bank: np.ndarray, bank_labels: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Each query's class votes, one neighbour at a time: the K most cosine-similar bank rows, each voting
    exp(cos / T) for each of its positive labels (rows of ``bank_labels`` are multi-hot)."""
    votes = np.zeros((len(queries), bank_labels.shape[1]))
    for q, query in enumerate(queries):
        cos = [float(query @ row) / (np.linalg.norm(query) * np.linalg.norm(row)) for row in bank]
        for j in sorted(range(len(bank)), key=lambda j: -cos[j])[:K]:
            votes[q] += math.exp(cos[j] / TEMPERATURE) * bank_labels[j]
    return votes


def test_the_knn_score_of_a_hand_made_case():
    """Bank: three images of class 0 along x, two of class 1 along y; every bank image votes (k = 20 > 5).
    The first query lies on y, so the two near class-1 neighbours outvote the three class-0 ones (a majority
    would say 0) and it is right; the second, labelled 1, lies on x and is wrong: top-1 50 %."""
    features = torch.tensor([[0.0, 1.0], [1.0, 0.02],  # queries
                             [1.0, 0.0], [1.0, 0.1], [1.0, -0.1], [0.0, 1.0], [0.1, 1.0]])  # bank
    targets = torch.tensor([1, 1, 0, 0, 0, 1, 1])
    assert knn_score(features, targets, queries=2, num_classes=2, multilabel=False) == pytest.approx(50.0)


@pytest.mark.parametrize("multilabel", [False, True], ids=["single-label", "multi-label"])
def test_the_knn_score_is_a_brute_force_vote_scored_by_scikit_learn(multilabel):
    """Random clustered features, 40 queries and a bank of 60 (so k = 20 leaves most of it out): the top-1
    accuracy, or the mean over classes of scikit-learn's average precision, of the brute-force votes."""
    rng = np.random.default_rng(0)
    classes = 4
    if multilabel:
        labels = (rng.random((100, classes)) < 0.35).astype(np.float32)
        features = labels @ rng.normal(size=(classes, 8)) + 0.8 * rng.normal(size=(100, 8))
    else:
        labels = rng.integers(0, classes, 100)
        features = rng.normal(size=(classes, 8))[labels] + 0.9 * rng.normal(size=(100, 8))
    queries = 40
    one_hot = labels if multilabel else np.eye(classes)[labels]
    votes = brute_force_votes(features[queries:], one_hot[queries:], features[:queries])
    if multilabel:
        kept = [c for c in range(classes) if labels[:queries, c].any()]
        expected = 100 * np.mean([average_precision_score(labels[:queries, c], votes[:, c]) for c in kept])
    else:
        expected = 100 * np.mean(votes.argmax(1) == labels[:queries])
    score = knn_score(torch.tensor(features, dtype=torch.float32), torch.tensor(labels), queries, classes, multilabel)
    assert 0 < expected < 100 and score == pytest.approx(expected, abs=1e-4)


def small_backbone() -> torch.nn.Module:
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=1)
    net.fc = torch.nn.Identity()
    return net.train()


def test_a_pass_scores_what_mls_eval_would_and_leaves_the_training_as_it_was():
    """The pass decodes through a data loader (which draws from the random state) and runs the backbone in eval
    mode; after it the random state, the backbone's mode and its BatchNorm statistics are as before, and its score
    is the one of the features ``mls eval`` extracts from the same images with its own crop."""
    labelled = open_monitor(SCENES, image_size=32, count=12, split=0.5)
    monitor = LabelMonitor(labelled, every=1, image_size=32, batch_size=5, workers=0)
    net = small_backbone()
    bn = net.bn1.running_mean.clone()
    state = torch.get_rng_state()
    score = monitor.score(net, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), state) and net.training and torch.equal(net.bn1.running_mean, bn)

    images = Transformed(torch.utils.data.Subset(labelled.dataset, labelled.indices), eval_crop(32))
    features, targets = extract_features(net, images, batch_size=5, desc="test")
    net.train()
    votes = knn_scores(features[6:], targets[6:], features[:6], len(labelled.classes), True, K, TEMPERATURE)
    kept = [c for c in range(votes.shape[1]) if targets[:6, c].any()]
    expected = 100 * np.mean([average_precision_score(targets[:6, c], votes[:, c]) for c in kept])
    assert score == pytest.approx(expected, abs=1e-3)


def write_class_folders(root: Path, counts: dict[str, int]) -> Path:
    rng = np.random.default_rng(0)
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def test_the_monitor_reads_class_folders_voc_and_coco_as_mls_eval_does(tmp_path):
    """Class folders are single-label; VOC (its trainval images only: the test split stays unseen) and a COCO json
    (images in ../NAME/) multi-label. The sample is fixed (not the run's seed) and split into queries and bank."""
    folders = open_monitor(str(write_class_folders(tmp_path / "pets", {"cat": 3, "dog": 5})), 32, 6, 0.5)
    assert (folders.classes, folders.multilabel, folders.metric) == (["cat", "dog"], False, "monitor/knn_top1")
    assert len(folders.indices) == 6 and len(set(folders.indices)) == 6 and folders.queries == 3
    assert folders.indices == open_monitor(str(tmp_path / "pets"), 32, 6, 0.5).indices
    assert [folders.dataset[i][1] for i in range(8)] == [0, 0, 0, 1, 1, 1, 1, 1]

    write_voc(tmp_path / "voc", num_images=10, image_size=32, test_fraction=0.4)
    voc = open_monitor(str(tmp_path / "voc"), 32, 100, 0.25)
    assert voc.multilabel and voc.metric == "monitor/knn_map" and sorted(voc.indices) == list(range(6))
    assert voc.queries == 2  # round(0.25 x 6)

    annotations = write_coco(tmp_path / "coco", num_images=6, image_size=32, splits=("val2017",))["val2017"]
    coco = open_monitor(str(annotations), 32, 4, 0.5)
    image, target = coco.dataset[coco.indices[0]]
    assert coco.multilabel and len(coco.classes) == 8 and image.size == (32, 32) and target.sum() >= 1


def run_console(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["mls", *args])
    monkeypatch.delenv("MLS_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as stop:
        console()
    return stop.value.code, capsys.readouterr().out


def test_data_the_monitor_cannot_score_is_refused_in_one_line_before_the_run(tmp_path, monkeypatch, capsys):
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "a.png")
    write_class_folders(tmp_path / "one", {"cat": 2})
    cases = {
        tmp_path / "flat": f"mls: error: --monitor {tmp_path / 'flat'} holds no class folders; expected scenes",
        tmp_path / "one": f"mls: error: --monitor {tmp_path / 'one'} holds one class folder (cat): a k-NN score "
                          "needs images of at least two classes",
        tmp_path / "nowhere": f"mls: error: --monitor {tmp_path / 'nowhere'} does not exist; expected scenes",
    }
    for folder, expected in cases.items():
        code, out = run_console(monkeypatch, capsys, "pretrain", "--monitor", str(folder), "--out",
                                str(tmp_path / "run"))
        assert code.startswith(expected) and "\n" not in code and not out
    assert not (tmp_path / "run").exists()  # refused before anything was written
    code, _ = run_console(monkeypatch, capsys, "pretrain", "--monitor-split", "1.5")
    assert code == "mls: error: monitor_split: must be between 0 and 1, got 1.5"


@pytest.mark.parametrize("workers", [0, 2])
def test_an_unreadable_image_of_the_monitor_is_named_in_one_line(tmp_path, workers):
    root = write_class_folders(tmp_path / "pets", {"cat": 3, "dog": 3})
    (root / "dog" / "broken.png").write_bytes(b"not an image")
    labelled = open_monitor(str(root), 32, 7, 0.5)
    with pytest.raises(ValueError) as refused:
        labelled.decode(32, batch_size=4, workers=workers)
    message = str(refused.value)
    assert message.startswith(f"--monitor {labelled.name}: image ") and "cannot be read" in message
    assert "\n" not in message


def test_the_monitor_does_not_change_a_study_cell():
    """It changes nothing the run learns, so a stored cell is found again with the monitor on, off or elsewhere."""
    tiny = dict(TINY, epochs=1)
    assert cell_key(tiny, 0) == cell_key({**tiny, "monitor_every": 0}, 0) == \
        cell_key({**tiny, "monitor": "/data/pets", "monitor_images": 50, "monitor_split": 0.3}, 0)


def metrics_rows(out: Path) -> list[dict]:
    (path,) = (out / "csv").glob("version_*/metrics.csv")
    with open(path) as f:
        return list(csv.DictReader(f))


STEPS_PER_EPOCH = TINY["num_images"] // TINY["batch_size"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two epochs of the tiny demo with the monitor (32 held-out scenes, scored after each epoch) and without;
    the lines each run logged."""
    root = tmp_path_factory.mktemp("monitor")
    logged = {}
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")  # where rank_zero_info writes
    level = logger.level
    for name, every in (("with", 1), ("without", 0)):
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        try:
            pretrain(out=str(root / name), epochs=2, monitor_images=32, monitor_every=every, seed=1, **TINY)
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
        logged[name] = [r.getMessage() for r in records]
    return root, logged


@pytest.mark.slow
def test_a_tiny_run_logs_the_score_each_epoch_keeps_its_best_and_ends_with_it(runs):
    root, logged = runs
    rows = metrics_rows(root / "with")
    scores = {int(row["epoch"]): float(row["monitor/knn_map"]) for row in rows if row.get("monitor/knn_map")}
    assert sorted(scores) == [0, 1] and all(0 < s <= 100 for s in scores.values())
    best = max(sorted(scores), key=scores.get)
    checkpoints = root / "with" / "checkpoints"
    assert read_checkpoint(checkpoints / "best.ckpt")["global_step"] == STEPS_PER_EPOCH * (best + 1)
    assert Path(resolve_resume("auto", root / "with")).name in ("last.ckpt", "epoch001.ckpt")  # never best.ckpt
    assert not (root / "without" / "checkpoints" / "best.ckpt").exists()
    (line,) = [m for m in logged["with"][-1].splitlines() if m.startswith("monitor:")]
    assert line.startswith(f"monitor: k-NN mAP on 32 images of the built-in scenes (16 queries): {scores[1]:.1f} at "
                           f"epoch 1 (the last), best {scores[best]:.1f} at epoch {best} ({checkpoints}/best.ckpt); "
                           "this run's 2 passes took ")
    assert "monitor:" not in logged["without"][-1]
    assert {"monitor/knn_map", "train/loss"} <= set(plot_curves(root / "with", root / "curves.png"))


@pytest.mark.slow
def test_the_monitor_leaves_the_losses_as_they_were(runs):
    """The epoch after a monitor pass trains exactly as without it."""
    root, _ = runs
    losses = {name: [row["train/loss"] for row in metrics_rows(root / name) if row.get("train/loss")]
              for name in ("with", "without")}
    assert len(losses["with"]) == 2 * STEPS_PER_EPOCH and losses["with"] == losses["without"]


@pytest.mark.slow
@pytest.mark.distributed
def test_under_ddp_every_rank_logs_rank_zeros_score(tmp_path):
    """Two processes: the logged score is the one of the weights and BatchNorm statistics rank zero holds (those of
    its checkpoint), not a mean over ranks whose statistics differ; the best checkpoint is written once."""
    out = tmp_path / "ddp"
    options = {**TINY, "out": out, "epochs": 1, "max_steps": 2, "devices": 2, "strategy": "ddp", "monitor_images": 16}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541", "-m", "mls.cli",
           "pretrain", *(f"--{k.replace('_', '-')}={v}" for k, v in options.items())]
    result = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (logged,) = [float(row["monitor/knn_map"]) for row in metrics_rows(out) if row.get("monitor/knn_map")]
    model, _ = load_pretrained(out / "checkpoints" / "best.ckpt")
    monitor = LabelMonitor(open_monitor(SCENES, 32, 16, 0.5), every=1, image_size=32, batch_size=8, workers=0)
    assert monitor.score(model.backbone_q, torch.device("cpu")) == pytest.approx(logged, abs=1e-4)
