"""A run that notices: the health watch reports a collapsed queue and an extra loss stronger than InfoNCE, never warns
MoCo-v2 about an extra loss, follows the run (a condition that clears is reported as cleared), and warns or stops a
real run."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import mls.train.watch as watch
from conftest import TINY
from mls.method.health import queue_health
from mls.train import pretrain

REPLAY = Path(__file__).parents[1] / "docs" / "study" / "watch" / "replay.json"


def measures(queue: torch.Tensor, **forces) -> dict[str, float]:
    health = {k: float(v) for k, v in queue_health(queue, torch.ones(len(queue), dtype=torch.bool)).items()}
    return {**health, **forces}


def shorts(findings) -> list[str]:
    return [f.short for f in findings]


def test_a_queue_built_to_collapse_is_reported_and_a_spread_one_is_not():
    one_key = F.normalize(torch.randn(1, 32), dim=1).expand(256, 32)
    (found,) = watch.assess(measures(one_key), method="mocov2")
    assert found.short == "collapsed" and "effective rank of 1.0" in found.message
    assert "extra" not in found.message  # MoCo-v2 has no extra loss to blame
    assert "--extra-weight" in watch.assess(measures(one_key))[0].message
    spread = F.normalize(torch.randn(256, 32, generator=torch.Generator().manual_seed(0)), dim=1)
    assert watch.assess(measures(spread)) == []
    # keys bunched in one direction are no finding by themselves: real photos spread slowly
    direction = F.normalize(torch.randn(1, 32), dim=1)
    bunched = F.normalize(direction + 0.35 * F.normalize(torch.randn(256, 32), dim=1), dim=1)
    assert watch.assess(measures(bunched)) == []


def test_the_force_rule_compares_the_extra_loss_with_infonce_and_never_fires_for_mocov2():
    spread = F.normalize(torch.randn(256, 32, generator=torch.Generator().manual_seed(0)), dim=1)
    # λ 0.5 x 3.0 = 1.5 against InfoNCE's 1.2: a ratio of 1.25, worked by hand
    strong = measures(spread, extra_weight=0.5, grad_extra_neg=3.0, grad_infonce=1.2)
    (found,) = watch.assess(strong)
    assert found.short == "extra loss dominates" and found.value == pytest.approx(1.25)
    assert "1.50 against InfoNCE's 1.20" in found.message
    assert "mAP" not in found.message and "likely cause" not in found.message
    assert watch.assess(strong, method="mocov2") == []  # MoCo-v2 logs no extra force, and is never told of one
    assert watch.assess({**strong, "extra_weight": 0.0}) == []  # before the extra loss starts
    assert watch.assess({**strong, "grad_extra_neg": 2.4}) == []  # 1.2 against 1.2: not harder


class FakeRun:
    """A trainer and a module to feed the watch one log step at a time."""

    def __init__(self, method="mls", on_collapse="warn"):
        self.callback = watch.HealthWatch(on_collapse)
        self.module = SimpleNamespace(pending_health=None, model=SimpleNamespace(config=SimpleNamespace(method=method)))
        self.trainer = SimpleNamespace(global_step=0, should_stop=False)

    def log(self, step: int, **health) -> None:
        self.module.pending_health = {k: torch.tensor(v) for k, v in health.items()}
        self.trainer.global_step = step
        self.callback.on_train_batch_end(self.trainer, self.module, None, None, 0)
        assert self.module.pending_health is None


def test_a_condition_is_reported_after_patience_and_cleared_when_it_ends(caplog):
    caplog.set_level("INFO")
    run = FakeRun()
    ratios = [2.0, 2.0, 0.1, 2.0, 2.0, 2.0, 3.0, 0.1, 0.1, 0.1, 0.1]  # on at step 60, off from step 80, cleared at 100
    for n, ratio in enumerate(ratios):
        run.log(10 * (n + 1), extra_weight=1.0, grad_extra_neg=ratio, grad_infonce=1.0, rank_z=40.0)
        if n == 5:
            assert run.callback.status == "extra loss dominates"
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "warning at step 60" in logged and "cleared at step 100: extra loss dominates" in logged
    assert run.callback.status == "cleared" and not run.trainer.should_stop
    verdict = run.callback.verdict
    assert verdict.startswith("health: at the end, no sign")
    assert "earlier: extra loss dominates from step 60 to step 100 (worst 3.00), then cleared" in verdict


def test_a_resumed_run_keeps_what_its_watch_had_seen():
    run = FakeRun()
    for step in (10, 20, 30, 40, 50, 60):  # reported at 30, cleared at 60
        run.log(step, extra_weight=1.0, grad_extra_neg=2.0 if step <= 30 else 0.5, grad_infonce=1.0, rank_z=40.0)
    resumed = watch.HealthWatch()
    resumed.load_state_dict(run.callback.state_dict())
    assert resumed.verdict == run.callback.verdict and "from step 30 to step 60" in resumed.verdict
    assert resumed.status == "cleared"


def test_the_summary_reports_the_end_state_and_stop_ends_the_run():
    run = FakeRun(on_collapse="stop")
    for step in (10, 20):
        run.log(step, rank_z=1.5)
    assert not run.trainer.should_stop
    run.log(30, rank_z=1.2)
    assert run.trainer.should_stop and run.callback.verdict.startswith("health: at the end, the embedding has collapsed")
    assert FakeRun().callback.verdict.startswith("health: not judged")


@pytest.mark.skipif(not REPLAY.is_file(), reason="the watch's out-of-sample runs are not recorded yet")
def test_the_registered_rule_on_the_recorded_runs():
    """The logs of docs/study/watch's runs replayed through the watch: no run of a setting expected healthy (MoCo-v2,
    the recommended loss, the paper's setting after a warm-up) is warned, and the counts of false alarms and misses
    by the probe's label equal those the page reports."""
    record = json.loads(REPLAY.read_text())
    false_alarms = misses = 0
    for run in record["runs"]:
        fake = FakeRun(method=run["method"])
        for step, *values in run["log"]:
            fake.log(step, **{c: v for c, v in zip(record["columns"], values) if v is not None})
        warned = any(t.episodes for t in fake.callback.tracks.values())
        if run["variant"] in ("mocov2", "recommended", "paper_warmup"):
            assert not warned, run["name"]
        false_alarms += warned and not run["harmful"]
        misses += run["harmful"] and not warned
    assert (false_alarms, misses) == (record["false_alarms"], record["misses"])


@pytest.mark.slow
def test_a_run_warns_in_its_log_bar_and_summary_and_stops_when_asked(tmp_path, monkeypatch, capsys, caplog):
    """Wiring, with the limit set so that any extra loss counts as dominating: the warning reaches the log, the
    progress bar and the summary, and --on-collapse stop ends the run early with its checkpoint."""
    monkeypatch.setattr(watch, "FORCE_LIMIT", -1.0)
    tiny = dict(TINY, epochs=2, extra_start_epoch=0)
    caplog.set_level("INFO")
    pretrain(out=str(tmp_path / "warn"), max_steps=8, **tiny)
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "mls: warning at step" in logged and "negative terms push the queries harder" in logged
    assert "health: at the end, the extra loss's negative terms" in logged  # the summary
    assert "health=extra loss dominates" in capsys.readouterr().out  # the progress lines (a bar on a terminal)
    caplog.clear()
    last = pretrain(out=str(tmp_path / "stop"), on_collapse="stop", **tiny)
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] < 12  # 6 steps an epoch, 2 epochs: stopped after the patience
    assert "stopping the run" in "\n".join(record.getMessage() for record in caplog.records)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mocov2", "mls"])
def test_both_methods_log_the_health_measures_to_csv_and_tensorboard(tmp_path, method):
    import csv

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

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
