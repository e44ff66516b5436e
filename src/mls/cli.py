"""The ``mls`` command: every sub-command is a typed function, parsed by jsonargparse.

Options may be written with dashes or underscores (``--mls-loss`` or ``--mls_loss``);
``--config FILE.yaml`` on any sub-command sets its options from a file.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import sys

from jsonargparse import CLI

from mls.files import CheckpointNotWritten


def _commands() -> dict:
    """Sub-commands, imported here so that ``import mls.cli`` stays light."""
    from mls.data.synthetic import synth
    from mls.eval.commands import finetune, knn, linear
    from mls.export import export
    from mls.study import study
    from mls.train import pretrain
    from mls.transfer.commands import detect, segment
    from mls.viz.curves import plot
    from mls.viz.neighbors import neighbors
    from mls.viz.scores import scores

    return {
        "pretrain": pretrain,
        "synth": synth,
        "export": export,
        "eval": {"linear": linear, "finetune": finetune, "knn": knn},
        "transfer": {"detect": detect, "segment": segment},
        "visualize": {"neighbors": neighbors, "scores": scores},
        "plot": plot,
        "study": study,
    }


def _underscore_options(argv: list[str]) -> list[str]:
    """``--mls-loss=x`` -> ``--mls_loss=x``: option names only, never values."""
    out = []
    for arg in argv:
        if arg.startswith("--") and len(arg) > 2:
            name, sep, value = arg[2:].partition("=")
            arg = "--" + name.replace("-", "_") + sep + value
        out.append(arg)
    return out


# What bad input raises (a missing or unwritable path, an impossible setting, an unreadable checkpoint
# (mls.checkpoint.UnreadableCheckpoint, a ValueError), a checkpoint that could not be written): the
# message is the point.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError, CheckpointNotWritten)


_OPTION = re.compile(r"(?<![\w-])--([A-Za-z0-9]+(?:_[A-Za-z0-9]+)+)")


def dashed_options(text: str) -> str:
    """``--batch_size`` -> ``--batch-size`` in a help text: options as the README writes them (the
    parser, which takes both spellings, names them with underscores)."""
    return _OPTION.sub(lambda m: "--" + m.group(1).replace("_", "-"), text)


def main(argv: list[str] | None = None) -> None:
    """Parse ``argv`` and run the sub-command; errors propagate (for use from Python and tests)."""
    argv = sys.argv[1:] if argv is None else argv
    if not {"-h", "--help"} & set(argv):
        CLI(_commands(), prog="mls", args=_underscore_options(argv))
        return
    text = io.StringIO()
    try:
        with contextlib.redirect_stdout(text):
            CLI(_commands(), prog="mls", args=_underscore_options(argv))
    finally:
        sys.stdout.write(dashed_options(text.getvalue()))


def console() -> None:
    """The ``mls`` executable: bad input ends with ``mls: error: ...`` and exit status 1, not a traceback.

    Set ``MLS_TRACEBACK=1`` to see the traceback as well.
    """
    try:
        main()
    except USER_ERRORS as error:
        if os.environ.get("MLS_TRACEBACK"):
            raise
        sys.exit(f"mls: error: {error}")


if __name__ == "__main__":
    console()
