"""Whether a value has a declared type — the one check behind network configs, training recipes
and pipeline.json: a whole number is not a bool, a number is finite, a tuple or list holds values of
its item type."""

from __future__ import annotations

import math
import types
import typing
from typing import Any


def fits(value: Any, hint: Any) -> bool:
    """Whether a config value has its field's annotated type (ints are not bools, floats are finite)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin is list:
        return isinstance(value, list) and all(fits(v, args[0]) for v in value)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(fits(v, args[0]) for v in value)
        return len(args) == len(value) and all(fits(v, a) for v, a in zip(value, args, strict=True))
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def describe(hint: Any) -> str:
    names = {int: "int", float: "float", bool: "bool", str: "str", type(None): "None"}
    if hint in names:
        return names[hint]
    return str(hint).replace("typing.", "").replace("NoneType", "None")
