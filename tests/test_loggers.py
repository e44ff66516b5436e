"""``--logger``: Lightning's CSV, TensorBoard, W&B and MLflow loggers by name, for pretraining and fine-tuning, each
read back with its own library (MLflow's client; W&B's offline run file, read as the LevelDB log it is) and
compared with the CSV the same run wrote."""
import csv
import json
import struct
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import TINY
from mls.cli import main
from mls.loggers import build_loggers, log_places, logger_names
from mls.train import pretrain


def test_names_are_read_from_a_text_or_a_list_each_once_and_unknown_ones_refused():
    assert logger_names("csv, WandB,csv") == ("csv", "wandb")
    assert logger_names(["mlflow", "csv,tensorboard"]) == ("mlflow", "csv", "tensorboard")
    with pytest.raises(ValueError, match="logger: must name one or more of csv, tensorboard, wandb, mlflow"):
        logger_names("csv,comet")
    with pytest.raises(ValueError, match="logger: must name"):
        logger_names(" , ")


def test_a_missing_package_is_one_line_before_the_run_starts(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    monkeypatch.setattr(sys, "argv", ["mls", "pretrain", "--logger", "csv,wandb", "--out", str(tmp_path / "run")])
    from mls.cli import console

    with pytest.raises(SystemExit) as stop:
        console()
    assert stop.value.code == "mls: error: --logger wandb needs the wandb package: pip install mls-ssl[wandb]"
    assert not (tmp_path / "run").exists()


def test_the_summary_names_the_logs_a_run_wrote_without_csv(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    from mls.train.settings import PretrainSettings
    from mls.train.summary import run_summary

    trainer = SimpleNamespace(loggers=[TensorBoardLogger(tmp_path, name="tensorboard", version="")], global_step=4,
                              current_epoch=1)
    text = run_summary(trainer, PretrainSettings.resolve({}, "demo"), tmp_path, tmp_path / "last.ckpt")
    assert f"logs: {tmp_path / 'tensorboard'}\n" in text and f"tensorboard --logdir {tmp_path / 'tensorboard'}" in text
    assert "on average" not in text and "mls plot" not in text  # both read the CSV logs


def test_a_repeated_run_logs_its_csv_in_its_own_folder_under_the_commands_name(tmp_path):
    (logger,) = build_loggers("csv", tmp_path / "detect-voc" / "run1", repetition=True)
    assert log_places([logger]) == [str(tmp_path / "detect-voc" / "run1" / "metrics.csv")]


def test_a_resumed_run_continues_its_csv_file_rather_than_deleting_it(tmp_path):
    first = build_loggers("csv", tmp_path / "run0", repetition=True)[0]
    for step in range(3):
        first.log_metrics({"train/loss": float(step)}, step=step)
    first.save()
    again = build_loggers("csv", tmp_path / "run0", repetition=True)[0]  # the resumed part, one more column
    for step in range(3, 5):
        again.log_metrics({"train/loss": float(step), "lr": 0.1}, step=step)
    again.save()
    with open(tmp_path / "run0" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["step"]), float(r["train/loss"])) for r in rows] == [(s, float(s)) for s in range(5)]
    assert [r["lr"] for r in rows] == ["", "", "", "0.1", "0.1"]


def test_a_transfer_run_logs_where_its_options_say_with_its_settings(tmp_path):
    import yaml

    from mls.transfer.training import RunOptions

    run0 = tmp_path / "detect-voc" / "run0"
    trainer = RunOptions(logger=["csv", "tensorboard"], progress="off").trainer(run0, 5, settings={"lr": 0.02, "steps": [3]})
    assert log_places(trainer.loggers) == [str(run0 / "metrics.csv"), str(run0 / "tensorboard")]
    assert trainer.progress_bar_callback is None
    trainer.loggers[0].save()
    assert yaml.safe_load((run0 / "hparams.yaml").read_text()) == {"lr": 0.02, "steps": [3]}


def wandb_records(path: Path) -> list:
    """The records of an offline W&B run file: a LevelDB log (a 7-byte header, then 32 KiB blocks of chunks,
    each with a 7-byte header: CRC, length, type 1 full / 2 first / 3 middle / 4 last), each a protobuf Record."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32 * 1024
    assert data[:4] == b":W&B"
    records, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little left in the block for a header: padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_run(wandb_dir: Path) -> dict:
    """Project, name, config and history (one dict per logged row) of the one offline run under ``wandb_dir``."""
    (path,) = wandb_dir.glob("wandb/offline-run-*/run-*.wandb")
    run = {"config": {}, "history": []}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.update(project=record.run.project, name=record.run.display_name)
        elif kind == "config":
            run["config"].update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            run["history"].append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                   for item in record.history.item})  # "train/loss" as a nested key
    return run


def mlflow_run(uri: str, experiment: str):
    """The one MLflow run of ``experiment`` at ``uri`` and its client."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return client, run


def csv_series(path: Path, name: str) -> list[tuple[int, float]]:
    with open(path) as f:
        return [(int(row["step"]), float(row[name])) for row in csv.DictReader(f) if row.get(name)]


def assert_same_series(got: list[tuple[int, float]], expected: list[tuple[int, float]]) -> None:
    assert [step for step, _ in got] == [step for step, _ in expected]
    assert [value for _, value in got] == pytest.approx([value for _, value in expected], rel=1e-6)


@pytest.fixture
def offline_trackers(tmp_path, monkeypatch):
    """W&B offline in tmp_path/wandb, project "labs"; MLflow with neither a tracking URI nor an experiment named."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_PROJECT", "labs")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.delenv(name, raising=False)  # and set back as they were after the test
    return tmp_path / "wandb"


@pytest.mark.slow
def test_pretraining_logs_its_settings_and_losses_to_wandb_and_mlflow(tmp_path, offline_trackers, caplog):
    caplog.set_level("INFO")
    out = tmp_path / "run"
    pretrain(out=str(out), epochs=1, max_steps=4, logger="csv,wandb,mlflow", run_name="r18-tiny", **TINY)
    (metrics,) = (out / "csv").glob("version_*/metrics.csv")
    losses = csv_series(metrics, "train/loss")
    assert [step for step, _ in losses] == [0, 1, 2, 3]

    client, run = mlflow_run((out / "mlruns").as_uri(), "mls")  # the default store and experiment
    assert run.info.run_name == "r18-tiny" and run.info.status == "FINISHED"
    assert run.data.params["train/batch_size"] == "8" and run.data.params["model/topk"] == "4"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert_same_series(sorted((m.step, m.value) for m in history), losses)

    wandb = wandb_run(offline_trackers)
    assert (wandb["project"], wandb["name"]) == ("labs", "r18-tiny")
    assert wandb["config"]["train"]["batch_size"] == 8 and wandb["config"]["model"]["topk"] == 4
    logged = [(row["trainer/global_step"], row["train/loss"]) for row in wandb["history"] if "train/loss" in row]
    assert_same_series(logged, losses)

    summary = "\n".join(record.getMessage() for record in caplog.records)
    assert "W&B project labs, run r18-tiny (offline" in summary and f"MLflow experiment mls, run r18-tiny, at " \
        f"{(out / 'mlruns').as_uri()}" in summary


@pytest.mark.slow
def test_a_run_without_csv_logs_ends_with_its_summary(tmp_path, caplog):
    caplog.set_level("INFO")
    pretrain(out=str(tmp_path / "run"), epochs=1, max_steps=2, logger="tensorboard", progress="off", **TINY)
    assert not (tmp_path / "run" / "csv").exists() and any((tmp_path / "run" / "tensorboard").glob("events.*"))
    summary = "\n".join(record.getMessage() for record in caplog.records)
    assert "done: 2 steps" in summary and f"logs: {tmp_path / 'run' / 'tensorboard'}" in summary


def assert_trackers_hold(tmp_path, wandb_dir: Path, run_folder: Path, metric: str, expected: dict) -> None:
    """The one MLflow run (store tmp_path/store, experiment "probe") and the one offline W&B run are named after the
    run's folder, hold ``expected`` among their settings, and logged ``metric`` as the run's CSV file did."""
    losses = csv_series(run_folder / "metrics.csv", metric)
    assert losses
    name = f"{run_folder.parent.name}-{run_folder.name}"
    client, run = mlflow_run((tmp_path / "store").as_uri(), "probe")
    assert run.info.run_name == name
    assert {key: run.data.params[key] for key in expected} == {key: str(value) for key, value in expected.items()}
    history = client.get_metric_history(run.info.run_id, metric)
    assert_same_series(sorted((m.step, m.value) for m in history), losses)

    wandb = wandb_run(wandb_dir)
    assert (wandb["project"], wandb["name"]) == ("probe", name)
    assert {key: wandb["config"][key] for key in expected} == expected
    logged = [(row["trainer/global_step"], row[metric]) for row in wandb["history"] if metric in row]
    assert_same_series(logged, losses)


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "store").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")


@pytest.mark.slow
def test_fine_tuning_logs_each_run_with_its_settings_to_wandb_and_mlflow(tmp_path, offline_trackers, mlflow_store):
    out = tmp_path / "ft"
    main(["eval", "finetune", "--weights", "random", "--arch", "resnet18", "--dataset", "synthetic",
          "--synthetic-images", "16", "--image-size", "32", "--batch-size", "8", "--epochs", "2", "--runs", "1",
          "--seed", "3", "--workers", "0", "--logger", "csv,wandb,mlflow", "--project", "probe", "--progress", "off",
          "--out", str(out)])
    assert [step for step, _ in csv_series(out / "run0" / "metrics.csv", "train_loss")] == [1, 3]  # once an epoch
    assert_trackers_hold(tmp_path, offline_trackers, out / "run0", "train_loss",
                         {"epochs": 2, "lr": 0.05, "dataset": "synthetic", "seed": 3, "weights": "random"})


@pytest.mark.slow
def test_a_transfer_run_logs_its_settings_and_losses_to_wandb_and_mlflow(tmp_path, offline_trackers, mlflow_store):
    from mls.data.synthetic import write_voc
    from mls.transfer.commands import segment

    write_voc(tmp_path / "voc", num_images=8, image_size=32, seed=0)
    out = tmp_path / "seg"
    segment(weights="random", data=str(tmp_path / "voc"), dataset="voc-seg", runs=1, max_iters=4, batch_size=2,
            scale=[32, 32], crop_size=32, inference="whole", arch="resnet18", small_stem=True, workers=0,
            accelerator="cpu", out=str(out), logger="csv,wandb,mlflow", project="probe", progress="off")
    assert_trackers_hold(tmp_path, offline_trackers, out / "run0", "train/loss",
                         {"max_iters": 4, "crop_size": 32, "weights": "random", "seed": 0})
