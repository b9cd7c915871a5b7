"""Check a dataclass's field values against its type annotations.

Configs come from JSON files that anyone can write, and a value of the wrong type (``"r": "8"``,
``"target_modules": {}``) would otherwise travel into a layer's constructor and fail there, deep in
torch, or worse, silently work (``"use_dora": "false"`` is truthy). :func:`wrong_field_types` reads
the annotations (``int``, ``float``, ``bool``, ``str``, ``X | None``, ``list[X]``, ``dict[K, V]``,
``tuple``, ``Literal``, enums) and names each field whose value does not fit. An annotation it
does not understand accepts anything: a checker that guesses would refuse good configs.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import numbers
import types
import typing
from collections.abc import Sequence
from typing import Any, Literal, Union, get_args, get_origin


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def wrong_field_types(instance: Any) -> list[str]:
    """One line per field of dataclass ``instance`` whose value does not fit its annotation."""
    hints = _hints(type(instance))
    problems = []
    for field in dataclasses.fields(instance):
        hint = hints.get(field.name)
        value = getattr(instance, field.name)
        if hint is not None and not fits(value, hint):
            problems.append(f"{field.name}={_short(value)} is not {describe(hint)}")
    return problems


def fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` is of type ``hint`` (lenient where the annotation is beyond this checker)."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any or hint is object:
        return True
    if origin in (Union, types.UnionType):
        return any(fits(value, arg) for arg in args)
    if hint is type(None) or hint is None:
        return value is None
    if origin is Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:  # torch sizes and seeds are 64-bit; numpy's integers count
        return isinstance(value, numbers.Integral) and not isinstance(value, bool) and -(2**63) <= value < 2**63
    if hint is float:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return -(2**63) <= value < 2**63  # torch takes a Python int as a 64-bit one
        return isinstance(value, numbers.Real) and math.isfinite(value)  # a NaN scale makes every output NaN
    if hint is str:
        return isinstance(value, str)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return isinstance(value, (hint, str))
    if origin in (list, set, frozenset, Sequence) or hint in (list, set, tuple):
        return isinstance(value, (list, tuple, set, frozenset)) and (
            not args or all(fits(item, args[0]) for item in value)
        )
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(fits(item, args[0]) for item in value)
        return len(value) == len(args) and all(fits(v, a) for v, a in zip(value, args))
    if origin is dict or hint is dict:
        return isinstance(value, dict) and (
            not args or all(fits(k, args[0]) and fits(v, args[1]) for k, v in value.items())
        )
    return True


def describe(hint: Any) -> str:
    """``hint`` in words for an error message: ``an int or None``, ``a list of str``."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(arg) for arg in args)
    if hint is type(None) or hint is None:
        return "None"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, set, frozenset, Sequence, tuple) and args:
        return f"a list of {describe(args[0]).removeprefix('a ').removeprefix('an ')}"
    if origin is dict and args:
        return f"a dict of {describe(args[0]).removeprefix('a ')} to {describe(args[1]).removeprefix('a ')}"
    if hint is int:
        return "a 64-bit int"
    if hint is float:
        return "a finite float"
    name = getattr(hint, "__name__", str(hint))
    return f"an {name}" if name[:1] in "aeiouAEIOU" else f"a {name}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
