"""Transfer end to end on tiny synthetic data: fine-tune a few iterations, evaluate, write the report."""
import json
import math
from pathlib import Path

import pytest

from mls.cli import main
from mls.data.synthetic import write_coco, write_voc
from mls.transfer.commands import detect, segment

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY_DETECTOR = dict(max_iters=2, steps=[1], warmup_iters=1, batch_size=2, lr=0.01, train_sizes=[64], image_size=64,
                     max_size=64, fpn_channels=16, rois_per_image=32, arch="resnet18", small_stem=False, workers=0,
                     accelerator="cpu")


def _read_report(out):
    result = json.loads((out / "results.json").read_text())
    table = (out / "results.md").read_text()
    for m in result["metrics"]:
        assert 0.0 <= m["mean"] <= 100.0
        assert f"| {m['metric']}" in table
    return result


@pytest.mark.slow
def test_coco_with_masks_trains_mask_rcnn_and_reports_bbox_and_segm_ap(tmp_path):
    write_coco(tmp_path / "coco", num_images=4, image_size=64, seed=0)
    result = detect(weights="random", data=str(tmp_path / "coco"), format="coco", out=str(tmp_path / "out"),
                    **TINY_DETECTOR)
    assert result["protocol"] == "mask_rcnn_resnet18_fpn" and result["runs"] == 1  # COCO: 1 run by default
    assert [m["metric"] for m in _read_report(tmp_path / "out")["metrics"]] == [
        "bbox_AP", "bbox_AP50", "bbox_AP75", "segm_AP", "segm_AP50", "segm_AP75"]
    logged = (tmp_path / "out" / "run0" / "metrics.csv").read_text().splitlines()[0]
    assert "train/loss_mask" in logged and "train/loss_box_reg" in logged


@pytest.mark.slow
def test_voc_through_the_cli_trains_faster_rcnn_and_averages_two_runs(tmp_path):
    write_voc(tmp_path / "voc", num_images=8, image_size=64, seed=0)
    out = tmp_path / "out"
    config = str(CONFIGS / "transfer_voc_cpu_smoke.yaml")
    main(["transfer", "detect", "--config", config, "--data", str(tmp_path / "voc"), "--out", str(out),
          "--max-iters", "1", "--fpn-channels", "16", "--rois-per-image", "32"])
    result = _read_report(out)
    assert result["protocol"] == "faster_rcnn_resnet18_fpn" and result["dataset"] == "voc07"
    assert [m["metric"] for m in result["metrics"]] == ["bbox_AP", "bbox_AP50", "bbox_AP75"]
    first, second = (run["bbox_AP50"] for run in result["per_run"])
    ap50 = result["metrics"][1]
    assert ap50["mean"] == pytest.approx((first + second) / 2)
    assert ap50["std"] == pytest.approx(abs(first - second) / math.sqrt(2))  # sample std of two values
    assert result["settings"]["max_iters"] == 1 and result["settings"]["train_sizes"] == [64]


@pytest.mark.slow
def test_voc_segmentation_trains_an_fcn_and_reports_miou_macc_aacc(tmp_path):
    write_voc(tmp_path / "voc", num_images=8, image_size=32, seed=0)
    result = segment(weights="random", data=str(tmp_path / "voc"), dataset="voc-seg", runs=1, max_iters=2,
                     batch_size=2, scale=[32, 32], crop_size=32, inference="whole", arch="resnet18", small_stem=True,
                     workers=0, accelerator="cpu", out=str(tmp_path / "out"))
    assert result["num_classes"] == 9 and result["protocol"] == "fcn_resnet18"
    assert [m["metric"] for m in _read_report(tmp_path / "out")["metrics"]] == ["mIoU", "mAcc", "aAcc"]


def test_bad_options_are_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="--data is required"):
        detect(format="voc")
    with pytest.raises(ValueError, match="--format must be one of coco, voc"):
        detect(data=str(tmp_path), format="kitti")
    with pytest.raises(ValueError, match="multiple of devices x num_nodes = 2"):
        detect(data=str(tmp_path), batch_size=3, devices=2)
    with pytest.raises(ValueError, match="--scale needs"):
        segment(data=str(tmp_path), dataset="voc-seg", scale=[512])
    with pytest.raises(ValueError, match="lr must be a positive number"):
        segment(data=str(tmp_path), dataset="voc-seg", lr=0.0)


@pytest.mark.slow
def test_detection_starts_from_a_pretraining_checkpoint(tmp_path):
    from mls.train import pretrain

    ckpt = pretrain(out=str(tmp_path / "pre"), epochs=1, num_images=64, batch_size=16, queue_size=32, arch="resnet18",
                    image_size=32, max_steps=2, workers=0)
    write_coco(tmp_path / "coco", num_images=4, image_size=64, seed=1)
    options = {**TINY_DETECTOR, "arch": None, "small_stem": None, "max_iters": 1}
    result = detect(weights=str(ckpt), data=str(tmp_path / "coco"), out=str(tmp_path / "out"), **options)
    assert (result["arch"], result["small_stem"], result["weights"]) == ("resnet18", False, str(ckpt))


CLI_RUNS = {
    "detect": (lambda root: write_coco(root, num_images=4, image_size=64, seed=0), "transfer_coco_cpu_smoke.yaml",
               ["--head", "c4", "--max-iters", "1", "--steps", "[1]", "--warmup-iters", "1", "--fpn-channels", "16",
                "--rois-per-image", "8"],
               "mask_rcnn_resnet18_c4", ["bbox_AP", "bbox_AP50", "bbox_AP75", "segm_AP", "segm_AP50", "segm_AP75"]),
    "segment": (lambda root: write_voc(root, num_images=8, image_size=32, seed=0), "transfer_vocseg_cpu_smoke.yaml",
                ["--head", "pspnet", "--runs", "1", "--max-iters", "2", "--scale", "[32, 32]", "--crop-size", "32",
                 "--inference", "whole"],
                "pspnet_resnet18", ["mIoU", "mAcc", "aAcc"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("command", CLI_RUNS)
def test_the_cli_trains_coco_mask_rcnn_c4_and_a_voc_pspnet(tmp_path, command):
    write, config, options, protocol, metrics = CLI_RUNS[command]
    write(tmp_path / "data")
    out = tmp_path / "out"
    main(["transfer", command, "--config", str(CONFIGS / config), "--data", str(tmp_path / "data"), "--out", str(out),
          *options])
    result = _read_report(out)
    assert result["protocol"] == protocol and result["settings"]["head"] == options[1]
    assert [m["metric"] for m in result["metrics"]] == metrics
    if command == "detect":
        assert "train/loss_mask" in (out / "run0" / "metrics.csv").read_text().splitlines()[0]


def test_run_options_are_declared_once_and_unknown_heads_are_refused(tmp_path):
    import dataclasses
    import inspect
    import os

    from mls.transfer.training import RunOptions

    shared = [f.name for f in dataclasses.fields(RunOptions)]
    for command in (detect, segment):
        params = inspect.signature(command).parameters
        assert [name for name in params if name in shared] == shared
        assert all(params[f.name].default == f.default for f in dataclasses.fields(RunOptions))
        assert all(f"{name}: " in command.__doc__ for name in shared)
    assert RunOptions().loader_workers == min(4, os.cpu_count())
    with pytest.raises(ValueError, match="--head must be one of fpn, c4, got 'r50-c4'"):
        detect(data=str(tmp_path), head="r50-c4")
    with pytest.raises(ValueError, match="--head must be one of fcn, pspnet"):
        segment(data=str(tmp_path), head="psanet")
    with pytest.raises(ValueError, match="workers: must be >= 0"):
        segment(data=str(tmp_path), workers=-1)
