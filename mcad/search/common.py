"""Shared bits of `mcad index` / `mcad search`: argument parsing and the error type."""
from __future__ import annotations

from typing import Any

from mcad.config import parse_value


class SearchError(ValueError):
    """Bad input or a refused combination; the message is one line naming the file."""


def parse_args(argv: list[str], keys: dict[str, Any], flags: tuple[str, ...] = (),
               positional: int = 1, usage: str = "") -> tuple[list[str], dict[str, Any], set[str]]:
    """`pos ... key=value ... --flag` -> (positionals, options (defaults filled in), flags set).

    Unknown keys and flags are errors; values are parsed as YAML scalars (`k=5` -> 5)."""
    pos: list[str] = []
    opts = dict(keys)
    seen: set[str] = set()
    for a in argv:
        if a.startswith("--"):
            name = a[2:]
            if name in ("help", "h"):
                raise SearchError(usage or "see docs")
            if name not in flags:
                raise SearchError(f"unknown flag {a} (known: {', '.join('--' + f for f in flags) or 'none'})")
            seen.add(name)
        elif "=" in a and a.split("=", 1)[0].isidentifier():
            k, v = a.split("=", 1)
            if k not in keys:
                raise SearchError(f"unknown option {k}= (known: {', '.join(f'{x}=' for x in keys)})")
            opts[k] = v if k in ("index", "out", "run", "encoder", "data", "data_root", "images", "json")\
                else parse_value(v)
        else:
            pos.append(a)
    if len(pos) > positional:
        raise SearchError(f"too many positional arguments: {pos[positional:]}" + (f"\n{usage}" if usage else ""))
    return pos, opts, seen
