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


def check_trainable(kind: str, n: int, params: dict, dim: int | None = None) -> None:
    """One line, before faiss, for a gallery too small to train `kind` (faiss's k-means needs at
    least as many vectors as centroids: nlist coarse lists, 2^nbits codes per PQ sub-vector)."""
    from mcad.search import faiss_index

    if kind not in ("ivfsq8", "ivfpq") or n <= 0:
        return
    p = {**faiss_index.default_params(kind, n, dim or 64), **params}
    need, why = int(p["nlist"]), [f"nlist={p['nlist']} lists"]
    if kind == "ivfpq":
        need = max(need, 2 ** int(p["nbits"]))
        why.append(f"nbits={p['nbits']}: {2 ** int(p['nbits'])} codes per sub-vector")
        if dim and "m" in params and dim % int(params["m"]):
            raise SearchError(f"m={params['m']}: must divide the embedding size {dim} (the sub-vectors of ivfpq)")
    if n < need:
        raise SearchError(f"type={kind}: {n} images are too few to train it (at least {need}: {', '.join(why)}); "
                          f"index them with type=flat (exact; what type=auto picks for a gallery this size) "
                          f"or add images")
