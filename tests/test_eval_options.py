"""Evaluation options are declared once, as documented dataclass fields (``mls.eval.settings``): each field of a
command's protocol and of ``EvalRun`` is a keyword of the command with its default, documented in ``--help``, and
a value given, from Python or the command line, reaches the settings the command runs with."""
import dataclasses
import inspect
from pathlib import Path

import pytest

import mls.eval.commands as commands
from mls.cli import main
from mls.eval.settings import EvalRun, FinetuneOutput, FinetuneProtocol, KnnProtocol, LinearProtocol
from mls.method.settings import field_doc

COMMANDS = {"linear": (commands.linear, LinearProtocol), "finetune": (commands.finetune, FinetuneProtocol),
            "knn": (commands.knn, KnnProtocol)}
OUTPUT = {"finetune": (FinetuneOutput,)}  # a command's options after EvalRun's: where its logs go, its progress
# a value of each setting other than its default, and as the command line writes it
GIVEN = {"epochs": (3, "3"), "lr": (0.5, "0.5"), "weight_decay": (0.25, "0.25"), "precision": ("bf16-mixed", "bf16-mixed"),
         "k": (7, "7"), "temperature": (0.5, "0.5"), "weights": ("w.pth", "w.pth"), "dataset": ("coco", "coco"),
         "data": ("d", "d"), "runs": (3, "3"), "batch_size": (8, "8"), "image_size": (32, "32"),
         "arch": ("resnet18", "resnet18"), "small_stem": (True, "true"), "workers": (1, "1"), "out": ("o", "o"),
         "seed": (5, "5"), "synthetic_images": (16, "16"), "save_every": (2, "2"), "resume": ("auto", "auto"),
         "logger": ("tensorboard", "tensorboard"), "project": ("p", "p"), "run_name": ("r", "r"),
         "progress": ("off", "off")}
RESUMING = ("save_every", "resume")  # fine-tuning's: how its runs go on, given to the protocol, not its settings


@pytest.mark.parametrize("name", COMMANDS)
def test_every_field_is_a_documented_keyword_and_option_with_its_default(name, capsys):
    command, protocol = COMMANDS[name]
    fields = [*dataclasses.fields(protocol), *dataclasses.fields(EvalRun),
              *(f for group in OUTPUT.get(name, ()) for f in dataclasses.fields(group))]
    params = inspect.signature(command).parameters
    assert list(params) == [f.name for f in fields]
    for f in fields:
        assert params[f.name].kind is params[f.name].KEYWORD_ONLY and params[f.name].default == f.default
        assert f"    {f.name}: {field_doc(f)}.\n" in command.__doc__
    with pytest.raises(SystemExit):
        main(["eval", name, "--help"])
    shown = "".join(capsys.readouterr().out.split())
    for f in fields:
        assert f"--{f.name.replace('_', '-')}" in shown and "".join(field_doc(f).split()) in shown, f.name


@pytest.mark.parametrize("name", COMMANDS)
@pytest.mark.parametrize("through", ["python", "command line"])
def test_an_option_given_reaches_the_settings_the_command_runs_with(name, through, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # --out o, relative
    command, protocol = COMMANDS[name]
    seen = []
    monkeypatch.setattr(commands, "evaluate", lambda *args: seen.append(args))
    output = [f for group in OUTPUT.get(name, ()) for f in dataclasses.fields(group)]
    values = {f.name: GIVEN[f.name] for f in [*dataclasses.fields(protocol), *dataclasses.fields(EvalRun), *output]}
    if through == "python":
        command(**{option: value for option, (value, _) in values.items()})
    else:
        main(["eval", name, *[arg for option, (_, text) in values.items() for arg in (f"--{option}", text)]])
    (_, protocol_run, settings, _, run), = seen
    assert run == EvalRun(**{f.name: values[f.name][0] for f in dataclasses.fields(EvalRun)})
    assert settings == {f.name: values[f.name][0] for f in dataclasses.fields(protocol) if f.name not in RESUMING}
    if name == "finetune":
        assert {k: protocol_run.keywords[k] for k in RESUMING} == {k: values[k][0] for k in RESUMING}
    if output:  # fine-tuning: its progress, and loggers of the kind asked for in the folder of each run
        from lightning.pytorch.loggers import TensorBoardLogger

        assert protocol_run.keywords["progress"] == "off"
        (logger,) = protocol_run.keywords["loggers"](Path("o/run2"), 7)
        assert isinstance(logger, TensorBoardLogger) and logger.root_dir.startswith("o/run2")
        logger.finalize("success")  # its writer's thread done before the test leaves tmp_path


def test_unknown_options_are_refused_and_workers_are_read_when_a_command_runs(monkeypatch):
    with pytest.raises(TypeError, match="unexpected options: no_such_option"):
        commands.knn(no_such_option=1)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert EvalRun().loader_workers == 2 and EvalRun(workers=0).loader_workers == 0
