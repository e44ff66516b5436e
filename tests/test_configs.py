"""The shipped configs: the demo is what `mls pretrain` runs without options, the COCO ones hold the paper's settings."""
import dataclasses
from pathlib import Path

import pytest
import yaml
from jsonargparse import ArgumentParser

from mls.config import MLSConfig
from mls.train import pretrain
from mls.train.config import PretrainSettings

CONFIGS = Path(__file__).parents[1] / "configs"
COCO = ["mls_coco_r50_800ep.yaml", "mls_coco_r50_400ep.yaml", "mocov2_coco_r50_800ep.yaml",
        "mocov2_coco_r50_400ep.yaml"]
# The main paper's COCO pretraining (§3.3, §4.1): D of both queues, λ, m, dz, and the epochs in the file name.
PAPER = {"queue_size": 4096, "extra_weight": 0.5, "momentum": 0.995, "dim": 256, "tau": 0.2, "topk": 20,
         "lr": 0.3, "weight_decay": 1e-4, "arch": "resnet50"}


def parse(name):
    parser = ArgumentParser()
    parser.add_function_arguments(pretrain)
    return parser.parse_path(str(CONFIGS / name))


def test_demo_config_is_what_mls_pretrain_runs_without_options():
    demo = yaml.safe_load((CONFIGS / "demo_cpu.yaml").read_text())
    from_file = PretrainSettings.resolve(demo, preset="paper")
    without_options = PretrainSettings.resolve({})
    assert without_options.preset == "demo"
    assert dataclasses.replace(from_file, preset="demo") == without_options


def test_a_data_folder_takes_the_papers_settings_and_moco_v2_views():
    settings = PretrainSettings.resolve({"data": "photos/"})
    assert settings.preset == "paper"
    assert (settings.view.hue, settings.view.grayscale_p, settings.view.image_size) == (0.1, 0.2, 224)
    assert settings.model == MLSConfig()


@pytest.mark.parametrize("name", COCO)
def test_coco_configs_hold_the_papers_settings(name):
    cfg = parse(name)
    epochs = int(name.split("_")[-1].removesuffix("ep.yaml"))
    assert cfg.epochs == epochs
    mls_only = () if name.startswith("mls") else ("extra_weight", "topk")  # MoCo-v2 has no extra loss
    for key, value in PAPER.items():
        assert getattr(cfg, key) == (None if key in mls_only else value), key
    if name.startswith("mls"):
        assert (cfg.method, cfg.mls_loss, cfg.select_from, cfg.logits_from) == ("mls", "bce", "g", "z")
        assert (cfg.bce_balanced, cfg.extra_start_epoch) == (False, 0)  # Eq. 9 as written, from the start
    else:
        assert cfg.method == "mocov2"
    assert (cfg.hue, cfg.grayscale_p, cfg.min_scale, cfg.blur) == (0.1, 0.2, 0.2, True)  # MoCo-v2's views
    assert cfg.batch_size * cfg.devices == 256


def test_the_defaults_of_the_method_are_the_papers():
    config = MLSConfig()
    assert {k: getattr(config, k) for k in ("queue_size", "extra_weight", "momentum", "dim", "tau", "topk")} == \
        {"queue_size": 4096, "extra_weight": 0.5, "momentum": 0.995, "dim": 256, "tau": 0.2, "topk": 20}
