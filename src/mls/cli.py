"""The ``mls`` command: every sub-command is a typed function, parsed by jsonargparse.

Options may be written with dashes or underscores (``--mls-loss`` or ``--mls_loss``);
``--config FILE.yaml`` on any sub-command sets its options from a file; ``mls --version`` names the version.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys

from jsonargparse import CLI

from mls.files import CheckpointNotWritten


def _commands() -> dict:
    """Sub-commands, imported here so that ``import mls.cli`` stays light."""
    from mls.checkpoints.export import export
    from mls.data.sharding import shard
    from mls.data.synthetic import synth
    from mls.embedding.commands import embed, search_images
    from mls.eval.commands import finetune, knn, linear
    from mls.study import study
    from mls.train.commands import pretrain_command
    from mls.transfer.commands import detect, segment
    from mls.viz.curves import plot
    from mls.viz.neighbors import neighbors
    from mls.viz.scores import scores

    return {
        "pretrain": pretrain_command(),
        "synth": synth,
        "shard": shard,
        "export": export,
        "eval": {"linear": linear, "finetune": finetune, "knn": knn},
        "transfer": {"detect": detect, "segment": segment},
        "visualize": {"neighbors": neighbors, "scores": scores},
        "plot": plot,
        "study": study,
        "embed": embed,
        "search": search_images,
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
# (mls.checkpoints.pretrained.UnreadableCheckpoint, a ValueError), a checkpoint that could not be written): the
# message is the point.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError, CheckpointNotWritten)


_OPTION = re.compile(r"(?<![\w-])--([A-Za-z0-9]+(?:_[A-Za-z0-9]+)+)")


def dashed_options(text: str) -> str:
    """``--batch_size`` -> ``--batch-size`` in a help text: options as the README writes them (the
    parser, which takes both spellings, names them with underscores)."""
    return _OPTION.sub(lambda m: "--" + m.group(1).replace("_", "-"), text)


# How a type of jsonargparse's report reads to a user.
_TYPE_WORDS = {"float": "a number", "int": "a whole number", "bool": "true or false", "str": "text"}


def usage_error(error: argparse.ArgumentError) -> str:
    """jsonargparse's report of a bad option value, unknown option or config key, in one line: the option
    (with dashes, as ``--help`` writes it), the value given and what it accepts."""
    text = str(error).strip()
    key = re.match(r'Parser key "([^"]+)":\s*(.*)', text, re.S)
    if key is None:
        first = text.splitlines()[0] if text else "bad usage"
        first = re.sub(r"Subcommand '([\w ]+)' does not accept option '([\w-]+)'",
                       lambda m: f"unknown option or config key --{m.group(2)} of mls {m.group(1)}", first)
        first = re.sub(r"^unrecognized arguments: (\S+).*", r"unknown option \1", first)
        return dashed_options(first) + " (see --help)"
    name, detail = key.groups()
    given = re.search(r"(?:Given|Got) value: (.*)", detail)
    choices = re.search(r"Literal\[(.*?)\]", detail)
    if choices:
        accepted = "one of " + ", ".join(c.strip().strip("'\"") for c in choices.group(1).split(","))
    else:
        expected = " ".join(re.findall(r"Expected an? (.*)", detail))
        types = [t for t in re.findall(r"<class '(\w+)'>", expected) if t != "NoneType"]
        accepted = " or ".join(dict.fromkeys(_TYPE_WORDS.get(t, t) for t in types))
    option = "--" + name.replace("_", "-")
    if given is None or not accepted:
        return f"{option}: {detail.splitlines()[0].strip()}"
    return f"{option}: got {given.group(1).strip()!r}, expected {accepted}"


def main(argv: list[str] | None = None) -> None:
    """Parse ``argv`` and run the sub-command; errors propagate (for use from Python and tests): a bad option
    value, an unknown option or config key as ``argparse.ArgumentError`` (``usage_error`` words it)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--version"]:
        from mls import __version__

        print(f"mls {__version__}")
        return
    if not {"-h", "--help"} & set(argv):
        CLI(_commands(), prog="mls", args=_underscore_options(argv), exit_on_error=False)
        return
    text = io.StringIO()
    try:
        with contextlib.redirect_stdout(text):
            CLI(_commands(), prog="mls", args=_underscore_options(argv))
    finally:
        sys.stdout.write(dashed_options(text.getvalue()))


def console() -> None:
    """The ``mls`` executable: bad input ends with one line ``mls: error: ...`` and exit status 1 (2 for a bad
    option or config key), not a traceback or a usage dump.

    Set ``MLS_TRACEBACK=1`` to see the traceback as well.
    """
    try:
        main()
    except argparse.ArgumentError as error:
        if os.environ.get("MLS_TRACEBACK"):
            raise
        print(f"mls: error: {usage_error(error)}", file=sys.stderr)
        sys.exit(2)
    except USER_ERRORS as error:
        if os.environ.get("MLS_TRACEBACK"):
            raise
        sys.exit(f"mls: error: {error}")


if __name__ == "__main__":
    console()
