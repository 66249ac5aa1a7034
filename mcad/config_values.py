"""Values of `key=value` overrides and recipes: YAML parsing, the type a default asks for, coercion
to it (one line naming the key when the text does not fit), and the ranges of numeric keys
(mcad.ranges). mcad.config applies them; the rules are in its module doc."""
from __future__ import annotations

import types as _types
import typing
from pathlib import PurePath
from typing import Any

import yaml

from mcad.ranges import range_problem, run_name_problem

NULLS = ("", "null", "Null", "NULL", "~")
TRUE, FALSE = {"1", "true", "yes", "on", "y"}, {"0", "false", "no", "off", "n"}


class ConfigError(ValueError):
    pass


# -- values --------------------------------------------------------------------------------------------
# keys that take a registry name or a whole mapping (`model=student-mobile`, or a model of its own:
# `model={base: clip, text: {layers: 4}}`), on the command line as in a recipe
NAME_OR_MAPPING = frozenset({"model"})


def name_or_mapping(key: str, text: str) -> str | dict:
    if not text.strip().startswith("{"):
        if not text.strip():
            raise ConfigError(f"{key}: expected a name or a mapping, got {text!r}")
        return text.strip()
    value = parse_value(text)
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: {text!r} is not a YAML mapping (quote it whole: \"{key}={{a: 1, b: 2}}\")")
    return value


def parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def type_of(default: Any) -> Any:
    """The type a default asks for: list[int] for [1, 2], str for a Path, Any for None."""
    if default is None:
        return Any
    if isinstance(default, PurePath):
        return str
    if isinstance(default, (list, tuple)):
        elem = type_of(default[0]) if default else Any
        return list[elem] if isinstance(default, list) else tuple[elem, ...]
    return type(default) if isinstance(default, (bool, int, float, str)) else Any


class _Mismatch(Exception):
    pass


def coerce(key: str, text: str, hint: Any, optional: bool = False) -> Any:
    """`text` as `hint` asks, or a one-line ConfigError naming `key`."""
    hint, opt = _unwrap(hint)
    if (optional or opt) and text.strip() in NULLS:
        return None
    try:
        return _convert(text, hint, raw=True)
    except _Mismatch:
        raise ConfigError(f"{key}: expected {_describe(hint)}, got {text!r}") from None


def _unwrap(hint: Any) -> tuple[Any, bool]:
    """`int | None` -> (int, True); a union with str or Path in it is text (a path or a name)."""
    if typing.get_origin(hint) in (typing.Union, _types.UnionType):
        args = typing.get_args(hint)
        rest = [a for a in args if a is not type(None)]
        if any(a is str or (isinstance(a, type) and issubclass(a, PurePath)) for a in rest):
            return str, len(rest) < len(args)
        return (rest[0] if len(rest) == 1 else Any), len(rest) < len(args)
    if isinstance(hint, type) and issubclass(hint, PurePath):
        return str, False
    return hint, False


def _convert(value: Any, hint: Any, raw: bool) -> Any:
    """`value` (command-line text when `raw`, else already YAML) as `hint`; _Mismatch when it can't."""
    hint, _ = _unwrap(hint)
    origin = typing.get_origin(hint) or hint
    if hint is Any or hint is None:
        return parse_value(value) if raw else value
    if hint is str:
        if raw or isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _Mismatch
    if origin in (list, tuple):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        elem = args[0] if args else Any
        v = parse_value(value) if raw else value
        if isinstance(v, (list, tuple)):
            items = [_convert(x, elem, raw=False) for x in v]
        elif raw:  # `a,b` -> ["a", "b"]: each piece is text, typed like a single value
            items = [_convert(x.strip(), elem, raw=True) for x in str(value).split(",") if x.strip()]
        else:
            items = [_convert(v, elem, raw=False)]
        return origin(items)
    v = parse_value(value) if raw else value
    if origin is bool:
        if isinstance(v, bool):
            return v
        if isinstance(v, int) and v in (0, 1):
            return bool(v)
        if isinstance(v, str) and v.strip().lower() in TRUE | FALSE:
            return v.strip().lower() in TRUE
        raise _Mismatch
    if origin in (int, float):
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            raise _Mismatch
        try:
            x = float(v) if isinstance(v, str) else v
        except ValueError:
            raise _Mismatch from None
        if origin is float:
            return float(x)
        if isinstance(x, float) and not x.is_integer():
            raise _Mismatch
        return int(x)
    if origin is dict:
        if isinstance(v, dict):
            return v
        raise _Mismatch
    return v


def _describe(hint: Any) -> str:
    hint, _ = _unwrap(hint)
    origin = typing.get_origin(hint) or hint
    if origin in (list, tuple):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        plural = {bool: "bools", int: "ints", float: "numbers", str: "names"}
        return "a list of " + plural.get(args[0] if args else Any, "values")
    return {bool: "a bool (true/false)", int: "an int", float: "a number", str: "text",
            dict: "a mapping"}.get(origin, "a value")


# -- ranges (declared in mcad.ranges) -------------------------------------------------------------------
def check_value(key: str, value: Any, text: str | None = None) -> None:
    """One line for a value outside its key's range (`lr=-1: must be a positive number`), or a
    top-level `name` that would put the run outside out= or in out= itself."""
    leaf = key.rsplit(".", 1)[-1]
    shown = text if text is not None else (",".join(map(str, value)) if isinstance(value, (list, tuple)) else value)
    problem = range_problem(leaf, value)
    if problem is None and key == "name" and isinstance(value, str):
        problem = run_name_problem(value)
    if problem:
        raise ConfigError(f"{key}={shown}: {problem}")


def check_ranges(cfg: dict, where: str = "", prefix: str = "") -> None:
    """check_value over every key of `cfg` (a recipe as read, a command's defaults); `where`, the
    recipe's file, starts the line."""
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            check_ranges(v, where, f"{key}.")
            continue
        try:
            check_value(key, v)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}" if where else str(e)) from None
