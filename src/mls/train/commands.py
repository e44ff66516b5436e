"""``mls pretrain`` as the command line parses it: ``pretrain`` with one documented option per setting."""
from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from mls.command_options import flat_options
from mls.method.settings import field_doc
from mls.train.fit import pretrain
from mls.train.settings import PRESET_HELP, PRESETS, SETTINGS


def _describe(f) -> str:
    """An option's help: its doc, the paper's default and, where they differ, the recommended and demo values."""
    others = [(name, PRESETS[name].get(f.name, f.default)) for name in ("recommended", "demo")]
    return f"{field_doc(f)} [paper: {f.default}" + "".join(
        f"; {name}: {value}" for name, value in others if value != f.default) + "]"


def pretrain_command() -> Callable[..., Path]:
    """``pretrain`` as ``mls pretrain`` parses it: a new function each call, with one keyword-only parameter
    per setting (``flat_options``: default None, documented by ``_describe``) and the presets described in
    ``preset``'s help. ``pretrain`` itself is left as it is defined."""
    def command(out: str | None = None, resume: str | None = None,
                preset: Literal["auto", "demo", "recommended", "paper"] = "auto", **options) -> Path:
        return pretrain(out, resume, preset, **options)

    presets = ", ".join(f"{name} ({text})" for name, text in PRESET_HELP.items())
    doc = inspect.cleandoc(pretrain.__doc__).split("\n    preset:")[0]  # its Args end with preset, **options
    command.__doc__ = f"{doc}\n    preset: where unset options come from: auto (demo without --data, else " \
                      f"recommended), {presets}.\n"
    return flat_options(command, SETTINGS, unset_is_none=True, describe=_describe)
