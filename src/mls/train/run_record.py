"""What a run leaves besides its checkpoints and logs, to repeat it and to use its result elsewhere.

``OUT/config.yaml`` holds the settings as the run resolved them (the preset and the defaults filled in, under
the names of ``mls pretrain --help``), written before training so that a crashed run has it too:
``mls pretrain --config OUT/config.yaml --out OTHER`` runs the same thing. ``OUT/export/backbone.safetensors``
is the query backbone of the last checkpoint, written at the end by ``mls export``'s own function.
"""
from __future__ import annotations

from pathlib import Path

import torch
import yaml
from lightning.pytorch.utilities import rank_zero_only

import mls
from mls.checkpoints.export import export_backbone
from mls.files import atomic_write
from mls.train.settings import PretrainSettings

CONFIG = "config.yaml"
BACKBONE = Path("export") / "backbone.safetensors"
PATH_SETTINGS = ("data", "annotations")  # read relative to the folder a run starts in


def config_values(settings: PretrainSettings) -> dict:
    """Every setting by name, as ``--config`` reads it: ``preset``, then each group's fields; a local path
    made absolute (so that the file works from any folder; a URL or null stays), tuples as lists."""
    values = {"preset": settings.preset, **settings.values()}
    for name in PATH_SETTINGS:
        if values[name] is not None and Path(values[name]).exists():
            values[name] = str(Path(values[name]).resolve())
    return {name: list(value) if isinstance(value, tuple) else value for name, value in values.items()}


def config_text(settings: PretrainSettings) -> str:
    """``config.yaml``: the settings, after comments naming the versions the run ran under and how to repeat it."""
    header = (f"# mls pretrain's settings as resolved by mls {mls.__version__} (torch {torch.__version__}): every\n"
              "# option, the preset's values and the defaults filled in; data: null is the built-in scenes. Repeat\n"
              "# the run with\n"
              "#   mls pretrain --config config.yaml --out OTHER\n")
    return header + yaml.safe_dump(config_values(settings), sort_keys=False, allow_unicode=True)


@rank_zero_only
def write_config(settings: PretrainSettings, out: Path) -> Path:
    """``OUT/config.yaml``, atomically, on rank zero only."""
    return atomic_write(out / CONFIG, lambda tmp: Path(tmp).write_text(config_text(settings), encoding="utf-8"))


@rank_zero_only
def export_run_backbone(last: Path, out: Path) -> Path | None:
    """``OUT/export/backbone.safetensors`` from the run's last checkpoint, on rank zero only (None without one)."""
    if not last.is_file():
        return None
    (out / BACKBONE).parent.mkdir(exist_ok=True)
    return export_backbone(last, "safetensors", out / BACKBONE)[0]
