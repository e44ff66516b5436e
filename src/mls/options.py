"""Settings dataclasses as flat keyword options of a command function (for jsonargparse and ``help``).

``mls pretrain`` and ``mls transfer detect/segment`` take ``**options`` whose names, types, defaults
and docs are the fields of settings dataclasses: each setting is declared once, in its dataclass.
"""
from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable


def flat_options(fn: Callable, groups: tuple[type, ...], unset_is_none: bool = False,
                 describe: Callable[[dataclasses.Field], str] | None = None) -> Callable:
    """Give ``fn(..., **options)`` one keyword-only parameter per field of ``groups``, documented from the field.

    ``unset_is_none``: every option defaults to ``None`` (the function fills it, e.g. from a preset) and
    accepts ``None``; else each takes its field's default. ``describe(field)`` writes an option's help
    (default: the field's doc). The lines join the ``Args:`` section of ``fn``'s docstring.
    """
    params = [p for p in inspect.signature(fn).parameters.values() if p.kind is not p.VAR_KEYWORD]
    lines = []
    for group in groups:
        types = typing.get_type_hints(group)
        for f in dataclasses.fields(group):
            annotation = typing.Optional[types[f.name]] if unset_is_none else types[f.name]  # noqa: UP045 (built at run time)
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                                            default=None if unset_is_none else f.default, annotation=annotation))
            lines.append(f"    {f.name}: {describe(f) if describe else f.metadata['doc']}.\n")
    doc = inspect.cleandoc(fn.__doc__ or "")
    fn.__signature__ = inspect.signature(fn).replace(parameters=params)
    fn.__doc__ = doc + ("\n" if "Args:" in doc else "\n\nArgs:\n") + "".join(lines)
    return fn
