"""The shipped configs: the demo is what `mls pretrain` runs without options, the COCO ones hold the paper's settings."""
import dataclasses
from pathlib import Path

import pytest
import yaml
from jsonargparse import ArgumentParser

from mls.method.settings import MLSConfig
from mls.train.commands import pretrain_command
from mls.train.settings import PRESET_HELP, PretrainSettings

CONFIGS = Path(__file__).parents[1] / "configs"
COCO = ["mls_coco_r50_800ep.yaml", "mls_coco_r50_400ep.yaml", "mocov2_coco_r50_800ep.yaml",
        "mocov2_coco_r50_400ep.yaml"]
# The main paper's COCO pretraining (§3.3, §4.1): D of both queues, λ, m, dz, and the epochs in the file name.
PAPER = {"queue_size": 4096, "extra_weight": 0.5, "momentum": 0.995, "dim": 256, "tau": 0.2, "topk": 20,
         "lr": 0.3, "weight_decay": 1e-4, "arch": "resnet50"}


def parse(name):
    parser = ArgumentParser()
    parser.add_function_arguments(pretrain_command())
    return parser.parse_path(str(CONFIGS / name))


def test_demo_config_is_what_mls_pretrain_runs_without_options():
    demo = yaml.safe_load((CONFIGS / "demo_cpu.yaml").read_text())
    from_file = PretrainSettings.resolve(demo, preset="paper")
    without_options = PretrainSettings.resolve({})
    assert without_options.preset == "demo"
    assert dataclasses.replace(from_file, preset="demo") == without_options


def test_a_data_folder_takes_the_recommended_extra_loss_over_the_papers_settings_and_moco_v2_views():
    settings = PretrainSettings.resolve({"data": "photos/"})
    assert settings.preset == "recommended"
    assert (settings.view.hue, settings.view.grayscale_p, settings.view.image_size) == (0.1, 0.2, 224)
    # the paper's model but for the extra loss: balanced, λ 0.25, from epoch 2
    assert settings.model == dataclasses.replace(MLSConfig(), extra_weight=0.25, bce_balanced=True)
    assert settings.train.extra_start_epoch == 2
    paper = PretrainSettings.resolve({"data": "photos/"}, preset="paper")
    assert paper.model == MLSConfig() and paper.train.extra_start_epoch == 0


def test_the_demo_uses_the_recommended_extra_loss():
    demo, recommended = PretrainSettings.resolve({}), PretrainSettings.resolve({"data": "photos/"})
    for name in ("extra_weight", "bce_balanced", "mls_loss", "select_from", "logits_from"):
        assert getattr(demo.model, name) == getattr(recommended.model, name), name
    assert demo.train.extra_start_epoch == recommended.train.extra_start_epoch


@pytest.mark.parametrize("options, preset, expected", [
    ({}, "auto", "MLS: ResNet-18, 64 px, D 1,024, k 20, λ 0.25 × BCE (Eq. 9) balanced from epoch 2"),
    ({"data": "d/"}, "paper", "MLS: ResNet-50, 224 px, D 4,096, k 20, λ 0.5 × BCE (Eq. 9) from the first step"),
    ({"data": "d/", "method": "mocov2"}, "auto", "MoCo-v2: ResNet-50, 224 px, D 4,096"),
    ({"data": "d/", "arch": "resnet18", "image_size": 96, "extra_ramp_epochs": 3}, "auto",
     "MLS: ResNet-18, 96 px, D 4,096, k 20, λ 0.25 × BCE (Eq. 9) balanced from epoch 2, ramped over 3 epochs"),
])
def test_the_summary_states_the_settings_as_resolved(options, preset, expected):
    assert PretrainSettings.resolve(options, preset).summary() == expected


@pytest.mark.parametrize("preset", ["demo", "recommended", "paper"])
def test_a_mocov2_runs_first_line_names_its_preset_without_an_extra_loss(preset):
    """Every preset's help describes its extra loss (λ, Eq. 9, its start); a MoCo-v2 run has none to describe."""
    mls = PretrainSettings.resolve({"data": "d/"}, preset).preset_line()
    mocov2 = PretrainSettings.resolve({"data": "d/", "method": "mocov2"}, preset).preset_line()
    assert mls == f"preset '{preset}' ({PRESET_HELP[preset]})"
    assert mocov2.startswith(f"preset '{preset}' (") and mocov2.endswith("MoCo-v2 has no extra loss)")
    for term in ("λ", "Eq. 9", "balanced", "from epoch", "first step"):
        assert term not in mocov2, term


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


@pytest.mark.parametrize("name, command, head, iters, data", [
    ("transfer_coco_maskrcnn_r50_c4_1x.yaml", "detect", "c4", 90_000, ("format", "coco")),
    ("transfer_voc0712_faster_r50_c4_24k.yaml", "detect", "c4", 24_000, ("format", "voc")),
    ("transfer_cityscapes_pspnet_r50_40k.yaml", "segment", "pspnet", 40_000, ("dataset", "cityscapes")),
])
def test_transfer_configs_hold_the_papers_schedules(name, command, head, iters, data):
    from mls.transfer import commands

    parser = ArgumentParser()
    parser.add_function_arguments(getattr(commands, command))
    cfg = parser.parse_path(str(CONFIGS / name))
    assert (cfg.head, cfg.max_iters, getattr(cfg, data[0]), cfg.arch) == (head, iters, data[1], "resnet50")
    if command == "detect":  # detectron2 1x (COCO) and MoCo's VOC protocol: batch 16, lr 0.02
        assert (cfg.batch_size, cfg.lr, cfg.image_size) == (16, 0.02, 800)
        assert cfg.steps == ([60_000, 80_000] if cfg.format == "coco" else [18_000, 22_000])
        assert cfg.train_sizes == list(range(640 if cfg.format == "coco" else 480, 801, 32))
    else:  # mmseg pspnet_r50-d8_4xb2-40k_cityscapes-769x769
        assert (cfg.batch_size, cfg.lr, cfg.crop_size, cfg.inference, cfg.stride) == (8, 0.01, 769, "slide", 513)


def test_the_study_finalists_grid_holds_valid_variants_that_are_not_the_demo_twice():
    from mls.study import BUDGETS, grid_cells
    from mls.study.grids import load_budget
    from mls.study.runner import cell_key

    cells = grid_cells(str(CONFIGS / "study_finalists.yaml"), BUDGETS["long"])
    assert list(cells)[:2] == ["mocov2", "paper"] and len(cells) >= 4
    keys = {cell_key({**BUDGETS["long"].pretrain, **options}, 0) for options in cells.values()}
    assert len(keys) == len(cells)  # every variant is a run of its own
    gpu = load_budget(str(CONFIGS / "study_long_gpu.yaml"))
    assert gpu.pretrain["epochs"] == BUDGETS["long"].pretrain["epochs"]
    assert cell_key({**gpu.pretrain, "augment_on": "cpu"}, 0) == cell_key(BUDGETS["long"].pretrain, 0)  # workers aside
