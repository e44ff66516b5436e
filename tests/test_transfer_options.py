"""Transfer options are declared once, as documented dataclass fields: each field of a command's model and
protocol is an option of the command, documented in ``--help`` (a protocol's with each data set's value),
and a value given, from Python or the command line, reaches the settings the command runs with."""
import dataclasses
import inspect
import json
import typing

import pytest

from mls.cli import main
from mls.transfer.commands import DETECT_OPTIONS, SEGMENT_OPTIONS, detect, segment
from mls.transfer.training import TransferOptions

# command name -> (function, its options, the option naming the data set)
COMMANDS = {"detect": (detect, DETECT_OPTIONS, "format"), "segment": (segment, SEGMENT_OPTIONS, "dataset")}


class _Reached(Exception):
    """Stops a command once its settings are resolved, before any data is read."""


def _other(value, annotation=None):
    """A value of the same type as ``value`` and different from it (each item of a tuple; another choice)."""
    if typing.get_origin(annotation) is typing.Literal:
        return next(choice for choice in typing.get_args(annotation) if choice != value)
    if isinstance(value, tuple):
        return tuple(_other(v) for v in value)
    if isinstance(value, bool):
        return not value
    return (value * 2 or 1.0) if isinstance(value, float) else value + 1


def _defaults(options: TransferOptions, key: str) -> dict:
    """Every model and protocol setting of data set ``key`` left unset, by option name."""
    model = options.model()
    return {**{f.name: getattr(model, f.name) for f in dataclasses.fields(model)},
            **{f.name: getattr(options.protocols[key], f.name) for f in dataclasses.fields(options.protocol)}}


def _command_line(name: str, values: dict) -> list[str]:
    """``mls transfer NAME --an-option VALUE ...``, lists in JSON."""
    args = ["transfer", name]
    for option, value in values.items():
        text = value if isinstance(value, str) else json.dumps(list(value) if isinstance(value, tuple) else value)
        args += [f"--{option.replace('_', '-')}", text]
    return args


@pytest.mark.parametrize("name", COMMANDS)
def test_every_model_and_protocol_field_is_an_option_with_its_doc_in_the_help(name, capsys):
    command, options, _ = COMMANDS[name]
    with pytest.raises(SystemExit):
        main(["transfer", name, "--help"])
    shown = "".join(capsys.readouterr().out.split())  # the help wraps lines, at hyphens too
    params = inspect.signature(command).parameters
    for group, per_data_set in ((options.model, False), (options.protocol, True)):
        types = typing.get_type_hints(group)
        for f in dataclasses.fields(group):
            option_type, param = f.metadata.get("type", types[f.name]), params[f.name]
            if per_data_set:  # unset: the data set's value, which the help lists
                expected = (None, option_type | None, options.describe(f))
            else:
                expected = (f.default, option_type, f.metadata["doc"])
            assert (param.default, param.annotation) == expected[:2] and param.kind is param.KEYWORD_ONLY, f.name
            assert f"{f.name}: {expected[2]}." in command.__doc__
            assert f"--{f.name.replace('_', '-')}" in shown and "".join(expected[2].split()) in shown, f.name


def test_the_help_of_a_protocol_option_lists_each_data_sets_value():
    detection = {f.name: f for f in dataclasses.fields(DETECT_OPTIONS.protocol)}
    assert DETECT_OPTIONS.describe(detection["max_iters"]) == "training iterations [coco: 90000; voc: 24000]"
    assert DETECT_OPTIONS.describe(detection["lr"]).endswith(" [coco, voc: 0.02]")
    assert DETECT_OPTIONS.describe(detection["steps"]).endswith(" [coco: 60000 80000; voc: 18000 22000]")
    assert DETECT_OPTIONS.describe(detection["train_sizes"]).endswith(" [coco: 640..800 step 32; voc: 480..800 step 32]")
    segmentation = {f.name: f for f in dataclasses.fields(SEGMENT_OPTIONS.protocol)}
    assert SEGMENT_OPTIONS.describe(segmentation["inference"]).endswith(" [cityscapes: slide; voc-seg: whole]")


@pytest.mark.parametrize("name", COMMANDS)
@pytest.mark.parametrize("through", ["python", "command line"])
@pytest.mark.parametrize("given", ["every option", "none"])
def test_an_option_given_to_a_command_reaches_its_model_or_protocol(name, through, given, monkeypatch):
    command, options, choice = COMMANDS[name]
    key = list(options.protocols)[-1]  # not the default data set: the choice must reach the protocol too
    defaults = _defaults(options, key)
    types = {**typing.get_type_hints(options.model), **typing.get_type_hints(options.protocol)}
    values = {option: _other(value, types[option]) for option, value in defaults.items()} if given != "none" else {}
    resolve, seen = TransferOptions.settings, []

    def settings(self, key, given_options):
        seen.append(resolve(self, key, given_options))
        raise _Reached

    monkeypatch.setattr(TransferOptions, "settings", settings)
    with pytest.raises(_Reached):
        if through == "python":
            command(data="unread", **{choice: key}, **values)
        else:
            main(_command_line(name, {"data": "unread", choice: key, **values}))
    (_, model, protocol), = seen
    assert {**dataclasses.asdict(model), **dataclasses.asdict(protocol)} == {**defaults, **values}
    if given == "none":
        assert (model, protocol) == (options.model(), options.protocols[key])


def test_the_data_set_choices_are_the_protocol_tables_and_unknown_options_are_refused():
    for command, options, choice in COMMANDS.values():
        assert typing.get_args(typing.get_type_hints(command)[choice]) == tuple(options.protocols)
        with pytest.raises(TypeError, match="unexpected options: no_such_option"):
            command(data="unread", no_such_option=1)
