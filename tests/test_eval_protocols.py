"""End to end on the synthetic multi-label task: each protocol runs twice and writes its JSON and Markdown."""
from __future__ import annotations

import math
import statistics

import pytest

from conftest import read_report
from mls.cli import main
from mls.data.synthetic import CLASSES
from mls.eval.commands import finetune, knn, linear

TINY_EVAL = {"arch": "resnet18", "small_stem": True, "image_size": 32, "synthetic_images": 32, "workers": 0}


def check_report(result: dict, table: str, protocol: str, runs: int = 2) -> list[float]:
    """Shared checks of one report; returns the headline's per-run values."""
    assert (result["dataset"], result["protocol"], result["runs"]) == ("synthetic", protocol, runs)
    assert result["seeds"] == list(range(runs))
    headline, other = result["metrics"]
    assert (headline["metric"], other["metric"]) == ("mAP", "mAP_voc07") and headline["headline"]
    for m in result["metrics"]:
        assert len(m["values"]) == runs and all(0 < v <= 100 for v in m["values"])
        assert m["mean"] == pytest.approx(statistics.fmean(m["values"]))
    assert f"| synthetic | {protocol} | mAP (headline) | {headline['mean']:.2f} | {headline['std']:.2f} | {runs} |" in table
    # Per-class AP, averaged over runs: the classes that have test positives average to the headline mAP.
    per_class = result["per_class_ap"]
    assert list(per_class) == list(CLASSES)
    assert statistics.fmean(v for v in per_class.values() if not math.isnan(v)) == pytest.approx(headline["mean"])
    return headline["values"]


def test_linear_probe_through_the_cli(tmp_path, capsys):
    out = tmp_path / "linear"
    main(["eval", "linear", "--arch", "resnet18", "--small-stem", "true", "--image-size", "32",
          "--synthetic-images", "32", "--workers", "0", "--epochs", "3", "--runs", "2", "--out", str(out)])
    result, table = read_report(out)
    values = check_report(result, table, "linear")
    assert values[0] != values[1]  # seeds 0 and 1 train different linear layers
    assert result["settings"] == {"epochs": 3, "lr": 0.1, "weight_decay": 0.0}
    assert (result["arch"], result["small_stem"], result["image_size"]) == ("resnet18", True, 32)
    assert table in capsys.readouterr().out


def test_knn_is_deterministic_across_runs(tmp_path):
    knn(k=5, out=str(tmp_path), **TINY_EVAL)
    result, table = read_report(tmp_path)
    values = check_report(result, table, "knn")
    assert values[0] == values[1] and result["metrics"][0]["std"] == 0.0
    assert result["settings"] == {"k": 5, "temperature": 0.07}


@pytest.mark.slow
def test_finetune_takes_unset_options_from_the_recipe(tmp_path):
    finetune(epochs=1, batch_size=16, out=str(tmp_path), **TINY_EVAL)
    result, table = read_report(tmp_path)
    check_report(result, table, "finetune")
    assert result["settings"] == {"epochs": 1, "lr": 0.05, "weight_decay": 1e-4, "precision": "32-true"}
    assert result["batch_size"] == 16


def test_options_are_checked_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="--dataset must be one of .*got 'mnist'"):
        linear(dataset="mnist", out=str(tmp_path))
    with pytest.raises(ValueError, match="--runs must be at least 1, got 0"):
        knn(runs=0, out=str(tmp_path))
    assert not (tmp_path / "results.json").exists()


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A few steps of `mls pretrain` (resnet18, small stem, 32 px)."""
    from mls.train import pretrain

    return pretrain(out=str(tmp_path_factory.mktemp("pre")), epochs=1, num_images=64, batch_size=16, queue_size=32,
                    arch="resnet18", small_stem=True, image_size=32, max_steps=3, workers=0)


@pytest.mark.slow
@pytest.mark.parametrize("protocol, run", [("linear", lambda **kw: linear(epochs=2, **kw)), ("knn", knn),
                                           ("finetune", lambda **kw: finetune(epochs=1, batch_size=16, **kw))])
def test_each_protocol_evaluates_a_pretraining_checkpoint(pretrained, tmp_path, protocol, run):
    run(weights=str(pretrained), synthetic_images=32, workers=0, out=str(tmp_path))
    result, table = read_report(tmp_path)
    check_report(result, table, protocol)
    # architecture, stem and resolution come from the checkpoint, not from options
    assert (result["arch"], result["small_stem"], result["image_size"]) == ("resnet18", True, 32)
    assert result["weights"] == str(pretrained) and str(pretrained) in table


def test_the_seven_small_single_label_sets_fine_tune_for_the_papers_120_epochs():
    from mls.eval.finetune import recipe_for

    small = ("cub200", "flowers102", "cars", "aircraft", "pets", "dtd", "indoor67")  # main paper §4
    assert [recipe_for(name).epochs for name in small] == [120] * 7
    assert recipe_for("voc07").epochs == 100 and recipe_for("cub200", epochs=3).epochs == 3
