"""A run that notices: the health watch fires on collapsed or bunched queues, stays silent on spread ones and on
the measured healthy runs, and warns or stops a real run."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import mls.train.watch as watch
from conftest import TINY
from mls.health import queue_health
from mls.train import pretrain

RECORD = Path(__file__).parents[1] / "docs" / "study" / "health" / "watch_replay.json"


def measures(queue: torch.Tensor) -> dict[str, float]:
    return {k: float(v) for k, v in queue_health(queue, torch.ones(len(queue), dtype=torch.bool)).items()}


def test_a_queue_built_to_collapse_is_reported_and_a_spread_one_is_not():
    one_key = F.normalize(torch.randn(1, 32), dim=1).expand(256, 32)
    found = watch.assess(measures(one_key))
    assert found.short == "collapsed" and "effective rank of 1.0" in found.message
    assert "--preset recommended" in found.message  # names the option that avoids it

    spread = F.normalize(torch.randn(256, 32, generator=torch.Generator().manual_seed(0)), dim=1)
    assert watch.assess(measures(spread)) is None

    # keys bunched around one direction (cosine ~0.8 between them), as the paper's setting leaves its queue
    direction = F.normalize(torch.randn(1, 32), dim=1)
    bunched = F.normalize(direction + 0.35 * F.normalize(torch.randn(256, 32), dim=1), dim=1)
    found = watch.assess(measures(bunched))
    assert found.short == "not spreading" and "‖mean(Q_z)‖ = 0.9" in found.message
    assert "learning rate" in watch.assess(measures(bunched), method="mocov2").message


def run_watch(values, on_collapse="warn", steps_per_epoch=10):
    """Feed the watch one log step's measures per entry of ``values`` (mean_norm), from step 200 on."""
    callback = watch.HealthWatch(on_collapse)
    module = SimpleNamespace(pending_health=None, hparams=SimpleNamespace(steps_per_epoch=steps_per_epoch),
                             model=SimpleNamespace(config=SimpleNamespace(method="mls")))
    trainer = SimpleNamespace(global_step=200, should_stop=False)
    for n, value in enumerate(values):
        module.pending_health = {"mean_norm": torch.tensor(value), "rank_z": torch.tensor(40.0)}
        trainer.global_step = 200 + 10 * n
        callback.on_train_batch_end(trainer, module, None, None, 0)
        assert module.pending_health is None
    return callback, trainer


def test_the_watch_waits_for_patience_and_stops_when_asked():
    callback, trainer = run_watch([0.9, 0.9, 0.5, 0.9, 0.9])  # never three in a row
    assert callback.finding is None and not trainer.should_stop
    callback, trainer = run_watch([0.9, 0.9, 0.9])
    assert callback.finding.short == "not spreading" and not trainer.should_stop
    callback, trainer = run_watch([0.9, 0.9, 0.9], on_collapse="stop")
    assert trainer.should_stop


def test_the_limits_separate_the_measured_runs():
    """The logged ‖mean(Q_z)‖ and rank of the runs in docs/study/health, replayed through the watch: it fires
    on every run of the paper's setting and of Eq. 9 balanced from the first step, and on none of MoCo-v2's,
    the demo's or the warm-up's."""
    record = json.loads(RECORD.read_text())
    for run in record["runs"]:
        callback = watch.HealthWatch()
        module = SimpleNamespace(pending_health=None, hparams=SimpleNamespace(steps_per_epoch=run["steps_per_epoch"]),
                                 model=SimpleNamespace(config=SimpleNamespace(method=run["method"])))
        trainer = SimpleNamespace(global_step=0, should_stop=False)
        for step, mean_norm, rank in run["log"]:
            module.pending_health = {"mean_norm": torch.tensor(mean_norm), "rank_z": torch.tensor(rank)}
            trainer.global_step = step + 1
            callback.on_train_batch_end(trainer, module, None, None, 0)
        assert (callback.finding is not None) == run["degraded"], run["name"]


@pytest.mark.slow
def test_a_run_warns_in_its_log_bar_and_summary_and_stops_when_asked(tmp_path, monkeypatch, capsys, caplog):
    """Wiring, with the limit set so that any embedding counts as bunched: the warning reaches the log, the
    progress bar and the summary, and --on-collapse stop ends the run early with its checkpoint."""
    monkeypatch.setattr(watch, "MEAN_NORM_LIMIT", -1.0)
    monkeypatch.setattr(watch, "GRACE_STEPS", 0)
    tiny = dict(TINY, epochs=2)
    caplog.set_level("INFO")
    pretrain(out=str(tmp_path / "warn"), max_steps=8, **tiny)
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "mls: warning at step" in logged and "the embedding is not spreading" in logged
    assert "health: the embedding is not spreading" in logged  # the summary
    assert "health=not spreading" in capsys.readouterr().out  # the progress bar's postfix
    caplog.clear()
    last = pretrain(out=str(tmp_path / "stop"), on_collapse="stop", **tiny)
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] < 12  # 6 steps an epoch, 2 epochs: stopped after the grace and patience
    assert "stopping the run" in "\n".join(record.getMessage() for record in caplog.records)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mocov2", "mls"])
def test_both_methods_log_the_health_measures_to_csv_and_tensorboard(tmp_path, method):
    import csv

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from conftest import TINY

    pretrain(out=str(tmp_path / "run"), method=method, epochs=1, max_steps=3, **TINY)
    (metrics,) = (tmp_path / "run" / "csv").glob("version_*/metrics.csv")
    logged = {k for row in csv.DictReader(open(metrics)) for k, v in row.items() if v}
    expected = {"health/mean_norm", "health/uniformity", "health/alignment", "health/rank_z", "health/spread_z",
                "health/grad_infonce"}
    if method == "mls":
        expected |= {"health/rank_g", "health/grad_extra_pos", "health/grad_extra_neg", "health/logit_pos",
                     "health/logit_neg"}
    assert expected <= logged and (method == "mls" or not any("extra" in k for k in logged if k.startswith("health/")))
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert expected <= set(events.Tags()["scalars"])
