"""The shipped configs: the demo is what `mls pretrain` runs without options, the COCO ones parse."""
import inspect
from pathlib import Path

import pytest
import yaml
from jsonargparse import ArgumentParser

from mls.train import pretrain

CONFIGS = Path(__file__).parents[1] / "configs"


def test_demo_config_is_the_default_of_mls_pretrain():
    demo = yaml.safe_load((CONFIGS / "demo_cpu.yaml").read_text())
    defaults = {name: p.default for name, p in inspect.signature(pretrain).parameters.items()}
    assert set(demo) <= set(defaults)
    assert {k: str(v) for k, v in demo.items()} == {k: str(defaults[k]) for k in demo}


@pytest.mark.parametrize("name", ["demo_cpu.yaml", "mls_coco_r50_800ep.yaml", "mocov2_coco_r50_800ep.yaml"])
def test_pretraining_configs_parse(name):
    parser = ArgumentParser()
    parser.add_function_arguments(pretrain)
    cfg = parser.parse_path(str(CONFIGS / name))
    if "coco" in name:
        assert (cfg.arch, cfg.queue_size, cfg.tau, cfg.topk, cfg.epochs) == ("resnet50", 65536, 0.2, 20, 800)
        assert (cfg.hue, cfg.grayscale_p, cfg.min_scale, cfg.blur) == (0.1, 0.2, 0.2, True)  # MoCo-v2's views
        assert cfg.method == ("mls" if name.startswith("mls") else "mocov2")
