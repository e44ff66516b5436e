"""The ``mls`` command: every sub-command is a typed function, parsed by jsonargparse.

Options may be written with dashes or underscores (``--mls-loss`` or ``--mls_loss``);
``--config FILE.yaml`` on any sub-command sets its options from a file.
"""
from __future__ import annotations

import sys

from jsonargparse import CLI


def _commands() -> dict:
    """Sub-commands, imported here so that ``mls --help`` lists them all."""
    commands: dict = {}
    # Each sub-command registers itself below with one line.
    from mls.train import pretrain
    commands["pretrain"] = pretrain
    from mls.data.synthetic import synth
    commands["synth"] = synth
    from mls.export import export
    from mls.viz.curves import plot
    from mls.viz.neighbors import neighbors
    commands["visualize"] = {"neighbors": neighbors}
    commands["plot"] = plot
    commands["export"] = export
    from mls.eval.commands import finetune, knn, linear
    commands["eval"] = {"linear": linear, "finetune": finetune, "knn": knn}
    from mls.transfer.commands import detect, segment
    commands["transfer"] = {"detect": detect, "segment": segment}
    return commands


def _underscore_options(argv: list[str]) -> list[str]:
    """``--mls-loss=x`` -> ``--mls_loss=x``: option names only, never values."""
    out = []
    for arg in argv:
        if arg.startswith("--") and len(arg) > 2:
            name, sep, value = arg[2:].partition("=")
            arg = "--" + name.replace("-", "_") + sep + value
        out.append(arg)
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    CLI(_commands(), prog="mls", args=_underscore_options(argv))


if __name__ == "__main__":
    main()
