"""Bad command lines end in one `mls: error:` line that names the option (with dashes) and what it accepts."""
import re
import sys
from pathlib import Path

import pytest

from mls.cli import console


def run_console(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["mls", *args])
    monkeypatch.delenv("MLS_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as stop:
        console()
    captured = capsys.readouterr()
    message = stop.value.code if isinstance(stop.value.code, str) else captured.err
    return stop.value.code, message.strip(), captured.out


@pytest.mark.parametrize("args, expected", [
    (["pretrain", "--method", "foo"], "mls: error: --method: got 'foo', expected one of mocov2, mls"),
    (["pretrain", "--lr", "abc"], "mls: error: --lr: got 'abc', expected a number"),
    (["pretrain", "--preset", "nope"], "mls: error: --preset: got 'nope', expected one of auto, demo, recommended, paper"),
    (["pretrain", "--small_stem", "maybe"], "mls: error: --small-stem: got 'maybe', expected true or false"),
    (["pretrain", "--bogus", "1"], "mls: error: unknown option --bogus (see --help)"),
    (["study", "--seeds", "a"], "mls: error: --seeds: got 'a', expected a whole number"),
])
def test_a_bad_option_is_one_line(monkeypatch, capsys, args, expected):
    code, message, out = run_console(monkeypatch, capsys, *args)
    assert code == 2 and message == expected and not out  # no usage dump, no traceback


def test_an_unknown_key_in_a_config_file_is_one_line(monkeypatch, capsys, tmp_path):
    (tmp_path / "run.yaml").write_text("lr: 0.1\nbatch_sise: 8\n")
    code, message, _ = run_console(monkeypatch, capsys, "pretrain", "--config", str(tmp_path / "run.yaml"))
    assert code == 2 and message == "mls: error: unknown option or config key --batch-sise of mls pretrain (see --help)"
    (tmp_path / "typed.yaml").write_text("batch_size: many\n")
    code, message, _ = run_console(monkeypatch, capsys, "pretrain", "--config", str(tmp_path / "typed.yaml"))
    assert message == "mls: error: --batch-size: got 'many', expected a whole number"


def test_an_output_folder_that_cannot_be_written_is_refused_before_training(monkeypatch, capsys, tmp_path):
    (tmp_path / "a_file").write_text("")
    for out, reason in (("/proc/x", "cannot be created or written"), (str(tmp_path / "a_file"), "is a file")):
        code, message, printed = run_console(monkeypatch, capsys, "pretrain", "--out", out, "--max-steps", "1")
        assert code != 0 and message.startswith("mls: error: output folder") and reason in message
        assert len(message.splitlines()) == 1 and "GPU available" not in printed + message


def test_every_module_imports():
    """The quick tier touches every module: each imports on its own."""
    import importlib
    import pkgutil

    import mls

    names = [m.name for m in pkgutil.walk_packages(mls.__path__, "mls.")]
    assert len(names) > 40
    for name in names:
        importlib.import_module(name)


@pytest.mark.slow
def test_importing_mls_changes_no_logging_state():
    """Lightning's log filter is installed when a run starts, not when a module is imported."""
    import subprocess
    import textwrap

    code = textwrap.dedent("""
        import logging
        names = ["", "lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero", "lightning.pytorch"]
        import lightning  # Lightning's own handlers, which mls must leave as they are
        def state():
            return [(list(logging.getLogger(n).filters), list(logging.getLogger(n).handlers)) for n in names]
        before = state()
        import mls, mls.train.fit, mls.cli, mls.study.runner, mls.viz.neighbors, mls.transfer.commands
        assert state() == before, (before, state())
    """)
    subprocess.run([sys.executable, "-c", code], check=True)


def test_version_is_the_packages(monkeypatch, capsys):
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    (version,) = re.findall(r'^version = "(.+)"$', pyproject, re.M)
    monkeypatch.setattr(sys, "argv", ["mls", "--version"])
    console()
    assert capsys.readouterr().out == f"mls {version}\n"
