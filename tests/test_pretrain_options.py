"""``pretrain``'s options: typed for tools by ``PretrainOptions`` (written from the settings dataclasses), flat and
documented for ``mls pretrain`` by ``pretrain_command``, and importing the module rebinds nothing."""
import ast
import dataclasses
import inspect
import sys
import types
import typing
from pathlib import Path

import pytest
from jsonargparse import ArgumentParser

from mls.train import pretrain, pretrain_options
from mls.train.commands import _describe, pretrain_command
from mls.train.pretrain_options import PretrainOptions, pretrain_options_source, write_pretrain_options
from mls.train.settings import PRESET_HELP, SETTINGS

if sys.version_info >= (3, 11):
    from typing import Unpack
else:
    from typing_extensions import Unpack

CONFIGS = Path(__file__).parents[1] / "configs"
FIELDS = [(group, f) for group in SETTINGS for f in dataclasses.fields(group)]


def option_type(group: type, f: dataclasses.Field):
    """A setting's option type: the Literal of its choices (the extra losses' registry), else as declared."""
    if "choices" in f.metadata:
        return typing.Literal[tuple(f.metadata["choices"]())]
    return f.metadata.get("type", typing.get_type_hints(group)[f.name])


def members(t) -> set:
    """The types a union joins (``int | None``: int, NoneType); any other type alone."""
    return set(typing.get_args(t)) if typing.get_origin(t) in (typing.Union, types.UnionType) else {t}


def test_pretrain_keeps_the_signature_and_docstring_it_is_defined_with():
    import mls.train.fit as run

    assert run.pretrain is pretrain and not hasattr(pretrain, "__signature__")
    assert pretrain.__code__.co_filename == run.__file__ and pretrain.__qualname__ == "pretrain"
    definition = next(node for node in ast.parse(Path(run.__file__).read_text(encoding="utf-8")).body
                      if isinstance(node, ast.FunctionDef) and node.name == "pretrain")
    assert pretrain.__doc__ == ast.get_docstring(definition, clean=False)  # no text added at import
    params = inspect.signature(pretrain).parameters
    assert list(params) == ["out", "resume", "preset", "options"] and params["options"].kind is params["options"].VAR_KEYWORD
    assert typing.get_type_hints(pretrain)["options"] == Unpack[PretrainOptions]


def test_the_command_is_a_new_function_each_time_and_leaves_pretrain_as_it_is():
    doc = pretrain.__doc__
    first, second = pretrain_command(), pretrain_command()
    assert first is not second and first is not pretrain and first.__doc__ == second.__doc__
    assert pretrain.__doc__ == doc and not hasattr(pretrain, "__signature__")


def test_the_typed_dict_has_one_optional_key_per_setting_of_its_type():
    hints = typing.get_type_hints(PretrainOptions)
    assert list(hints) == [f.name for _, f in FIELDS]
    assert PretrainOptions.__required_keys__ == frozenset()  # total=False: every setting may be left out
    for group, f in FIELDS:
        assert members(hints[f.name]) == members(option_type(group, f)) | {type(None)}, f.name


def test_the_typed_dict_is_as_written_from_the_dataclasses():
    expected, written = pretrain_options_source(), inspect.getsource(PretrainOptions)
    assert written == expected, (
        "PretrainOptions in src/mls/train/pretrain_options.py differs from the settings dataclasses; rewrite it with "
        "`python -c \"from mls.train.pretrain_options import write_pretrain_options as w; w()\"`")


def test_the_writer_replaces_the_class_and_leaves_the_rest_of_the_module(tmp_path):
    module = Path(pretrain_options.__file__).read_text(encoding="utf-8")
    head, _, _ = module.partition("class PretrainOptions(")
    copy = tmp_path / "pretrain_options.py"
    copy.write_text(head + "class PretrainOptions(TypedDict, total=False):\n    stale: int\n", encoding="utf-8")
    assert write_pretrain_options(copy) and not write_pretrain_options(copy)
    assert copy.read_text(encoding="utf-8") == head + pretrain_options_source()


def test_the_command_has_pretrains_parameters_then_one_documented_option_per_setting():
    command = pretrain_command()
    params = list(inspect.signature(command).parameters.values())
    own = list(inspect.signature(pretrain).parameters.values())[:3]
    assert [(p.name, p.default, p.annotation, p.kind) for p in params[:3]] == \
        [(p.name, p.default, p.annotation, p.kind) for p in own]
    assert [p.name for p in params[3:]] == [f.name for _, f in FIELDS]
    for (group, f), param in zip(FIELDS, params[3:]):
        assert param.kind is param.KEYWORD_ONLY and param.default is None, f.name
        assert members(param.annotation) == members(option_type(group, f)) | {type(None)}, f.name
        assert f"    {f.name}: {_describe(f)}.\n" in command.__doc__


def test_the_help_lists_every_setting_with_the_papers_value_and_describes_each_preset(capsys):
    from mls.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["pretrain", "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    shown = "".join(text.split())  # the help wraps lines, at hyphens too
    for _, f in FIELDS:
        assert f"--{f.name.replace('_', '-')}" in text and "".join(_describe(f).split()) in shown, f.name
        assert "[paper:" in _describe(f)
    for name, help_text in PRESET_HELP.items():
        assert "".join(f"{name} ({help_text})".split()) in shown
    assert "".join("checkpoint to resume from, or \"auto\"".split()) in shown and "--out OUT" in text


def test_the_command_line_parses_each_option_with_its_type_and_leaves_the_rest_none():
    parser = ArgumentParser(exit_on_error=False)
    parser.add_function_arguments(pretrain_command())
    cfg = parser.parse_args(["--topk=5", "--lr=0.1", "--devices=auto", "--small_stem=true", "--method=mocov2"])
    assert (cfg.topk, cfg.lr, cfg.devices, cfg.small_stem, cfg.method) == (5, 0.1, "auto", True, "mocov2")
    assert parser.parse_args(["--devices=2"]).devices == 2
    assert cfg.epochs is None and cfg.preset == "auto" and cfg.out is None
    from_file = parser.parse_path(str(CONFIGS / "mocov2_coco_r50_800ep.yaml"))
    assert from_file.epochs == 800 and from_file.extra_weight is None  # left to the preset


def test_an_unknown_keyword_is_refused_before_anything_starts(tmp_path):
    with pytest.raises(ValueError, match=r"unknown settings \['foo'\]"):
        pretrain(out=str(tmp_path / "run"), foo=1)
    assert not (tmp_path / "run").exists()
