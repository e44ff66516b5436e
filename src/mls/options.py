"""Settings dataclasses as flat keyword options of a command function (for jsonargparse and ``help``).

``mls pretrain`` and ``mls transfer detect/segment`` take ``**options`` whose names, types, defaults
and docs are the fields of settings dataclasses: each setting is declared once, in its dataclass.
``split_options`` hands the options a command was given back to their dataclasses.
"""
from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable
from typing import Any

# The default of a field that has none: every preset (e.g. each data set's protocol) gives its own value.
NO_DEFAULT: Any = dataclasses.MISSING


def option_field(default: Any, doc: str, as_type: Any = None) -> Any:
    """A dataclass field with its one-line ``doc`` (the option's help) and ``default`` (``NO_DEFAULT``: none).

    ``as_type`` is the option's type where it is not the field's: ``list[int]`` for a ``tuple[int, ...]``
    field, since YAML and JSON write lists (``split_options`` gives the tuple back).
    """
    metadata = {"doc": doc} if as_type is None else {"doc": doc, "type": as_type}
    return dataclasses.field(default=default, metadata=metadata)


def flat_options(fn: Callable, groups: tuple[type, ...], unset_is_none: bool = False,
                 describe: Callable[[dataclasses.Field], str] | None = None) -> Callable:
    """Give ``fn(..., **options)`` one keyword-only parameter per field of ``groups``, documented from the field.

    ``unset_is_none``: every option defaults to ``None`` (the function fills it, e.g. from a preset) and
    accepts ``None``; else each takes its field's default. ``describe(field)`` writes an option's help
    (default: the field's doc). The lines join the ``Args:`` section of ``fn``'s docstring. A field's
    ``metadata["type"]`` (see ``option_field``) replaces its type as the option's. Applied again to the
    function it returns, it appends the options of further groups (each with its own ``unset_is_none``).
    """
    params = [p for p in inspect.signature(fn).parameters.values() if p.kind is not p.VAR_KEYWORD]
    lines = []
    for group in groups:
        types = typing.get_type_hints(group)
        for f in dataclasses.fields(group):
            option_type = f.metadata.get("type", types[f.name])
            annotation = typing.Optional[option_type] if unset_is_none else option_type  # noqa: UP045 (built at run time)
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                                            default=None if unset_is_none else f.default, annotation=annotation))
            lines.append(f"    {f.name}: {describe(f) if describe else f.metadata['doc']}.\n")
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
