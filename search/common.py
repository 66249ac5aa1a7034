"""Shared bits of `mcad index` / `mcad search`: argument parsing and the error type."""
from __future__ import annotations

from typing import Any

from mcad.config import ConfigError, parse_overrides

# paths and names: kept as the text given even where the default is None (`run=007` is a folder)
TEXT_KEYS = ("index", "out", "run", "encoder", "data", "data_root", "images", "json")


class SearchError(ValueError):
    """Bad input or a refused combination; the message is one line naming the file."""


def parse_args(argv: list[str], keys: dict[str, Any], flags: tuple[str, ...] = (),
               positional: int = 1, usage: str = "") -> tuple[list[str], dict[str, Any], set[str]]:
    """`pos ... key=value ... --flag` -> (positionals, options (defaults filled in), flags set),
    through mcad.config.parse_overrides: unknown keys and flags are errors naming the nearest one,
    values are typed like their defaults (YAML scalars where the default is None: `k=5` -> 5)."""
    if any(a in ("--help", "--h", "-h") for a in argv):
        raise SearchError(usage or "see docs")
    try:
        p = parse_overrides(argv, keys, positional=positional, flags=flags,
                            types={k: str for k in TEXT_KEYS if k in keys and keys[k] is None})
    except ConfigError as e:
        raise SearchError(str(e)) from None
    return p.positional, p.config, p.flags
