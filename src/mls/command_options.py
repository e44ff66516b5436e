"""Settings dataclasses as flat keyword options of a command function (for jsonargparse and ``help``).

``mls pretrain``, ``mls eval linear/finetune/knn`` and ``mls transfer detect/segment`` take ``**options`` whose
names, types, defaults and docs are the fields of settings dataclasses: each setting is declared once, in its
dataclass. ``split_options`` hands the options a command was given back to their dataclasses;
``CommandSettings`` does both for a command whose options are its groups' fields as declared. ``typed_dict_source``
writes those options out as a ``TypedDict``, for a function that takes them as ``**options`` to declare its
keywords to type checkers and editors (``mls.train.pretrain_options.PretrainOptions``).
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import types
import typing
from collections.abc import Callable
from typing import Any

from mls.method.settings import field_doc, field_type


def flat_options(fn: Callable, groups: tuple[type, ...], unset_is_none: bool = False,
                 describe: Callable[[dataclasses.Field], str] | None = None) -> Callable:
    """Give ``fn(..., **options)`` one keyword-only parameter per field of ``groups``, documented from the field.

    ``unset_is_none``: every option defaults to ``None`` (the function fills it, e.g. from a preset) and
    accepts ``None``; else each takes its field's default. ``describe(field)`` writes an option's help
    (default: the field's doc). The lines join the ``Args:`` section of ``fn``'s docstring. A field's
    ``field_type`` (``mls.method.settings``) is the option's type. Applied again to the
    function it returns, it appends the options of further groups (each with its own ``unset_is_none``).
    """
    params = [p for p in inspect.signature(fn).parameters.values() if p.kind is not p.VAR_KEYWORD]
    lines = []
    for group in groups:
        types = typing.get_type_hints(group)
        for f in dataclasses.fields(group):
            option_type = field_type(f, types)
            annotation = typing.Optional[option_type] if unset_is_none else option_type  # noqa: UP045 (built at run time)
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                                            default=None if unset_is_none else f.default, annotation=annotation))
            lines.append(f"    {f.name}: {describe(f) if describe else field_doc(f)}.\n")
    doc = inspect.cleandoc(fn.__doc__ or "")
    fn.__signature__ = inspect.signature(fn).replace(parameters=params)
    fn.__doc__ = doc + ("\n" if "Args:" in doc else "\n\nArgs:\n") + "".join(lines)
    return fn


def split_options(options: dict, groups: tuple[type, ...]) -> list[dict]:
    """The options a ``flat_options`` function was given, one dict per group: the fields of that group it holds.

    A list given for a tuple field becomes a tuple; a name of no group is refused as Python refuses an
    unexpected keyword argument.
    """
    names = [{f.name for f in dataclasses.fields(group)} for group in groups]
    unknown = set(options).difference(*names)
    if unknown:
        raise TypeError(f"unexpected options: {', '.join(sorted(unknown))}")
    split = []
    for group, fields in zip(groups, names):
        tuples = {name for name, t in typing.get_type_hints(group).items() if typing.get_origin(t) is tuple}
        split.append({name: tuple(value) if name in tuples and isinstance(value, list) else value
                      for name, value in options.items() if name in fields})
    return split


@dataclasses.dataclass(frozen=True)
class CommandSettings:
    """The options of a command, each a field of one of ``groups`` (settings dataclasses), in that order.

    ``options`` gives a command function ``fn(..., **options)`` those options (``flat_options``); ``settings``
    turns the ones it was given back into the dataclasses, one instance per group, each checked where it is
    declared (in its ``__post_init__``).
    """

    groups: tuple[type, ...]

    def options(self, fn: Callable) -> Callable:
        return flat_options(fn, self.groups)

    def settings(self, options: dict) -> list:
        return [group(**values) for group, values in zip(self.groups, split_options(options, self.groups))]


def _members(t: Any) -> tuple:
    """The types a union joins (``int | None``: ``int``, ``NoneType``); any other type alone."""
    return typing.get_args(t) if typing.get_origin(t) in (typing.Union, types.UnionType) else (t,)


def type_source(t: Any) -> str:
    """A type as Python source: ``int``, ``str | None``, ``Literal["a", "b"]``, ``tuple[int, ...]``.

    Classes other than builtins are refused: the module the source goes into would have to import them.
    """
    origin, args = typing.get_origin(t), typing.get_args(t)
    if t is None or t is type(None):
        return "None"
    if origin is typing.Literal:
        return f"Literal[{', '.join(json.dumps(a) if isinstance(a, str) else repr(a) for a in args)}]"
    if len(_members(t)) > 1:
        return " | ".join(type_source(a) for a in args)
    if origin is not None and origin.__module__ == "builtins":
        return f"{origin.__name__}[{', '.join('...' if a is Ellipsis else type_source(a) for a in args)}]"
    if isinstance(t, type) and t.__module__ == "builtins":
        return t.__name__
    raise TypeError(f"no source written for the type {t!r}: builtins, Literal and their unions only")


def typed_dict_source(name: str, groups: tuple[type, ...], doc: str) -> str:
    """The source of ``class NAME(TypedDict, total=False)`` with one key per field of ``groups``, of its option
    type or None (a field's ``field_type``, as ``flat_options`` takes it): the options
    that ``flat_options(fn, groups, unset_is_none=True)`` gives ``fn``, for ``def fn(**options: Unpack[NAME])``.

    Each group's keys follow a comment naming it; the module holding the class imports ``Literal`` and
    ``TypedDict`` from ``typing``.
    """
    lines = [f"class {name}(TypedDict, total=False):", f'    """{doc}"""']
    for group in groups:
        hints = typing.get_type_hints(group)
        lines += ["", f"    # {group.__module__}.{group.__name__}"]
        for f in dataclasses.fields(group):
            option_type = field_type(f, hints)
            none = "" if type(None) in _members(option_type) else " | None"
            lines.append(f"    {f.name}: {type_source(option_type)}{none}")
    return "\n".join(lines) + "\n"
