"""YAML recipes with `key=value` overrides (torchtune style): `a.b=3 lr=1e-3 name=run1`.

One parser for every command (`parse_overrides`): the command's defaults (a YAML recipe, a dict or
a dataclass) are its schema. A key absent from them is refused with the nearest valid key
(`stpes: unknown key; did you mean steps?`), and a value must fit its default's type
(`steps: expected an int, got 'abc'`), so a typo can no longer silently run the defaults.

Types, from the default (or from `types=` / a dataclass's annotations where the default is None):
  str: the text as given (paths and names are never YAML-parsed: `name=007` stays "007");
  int / float / bool: YAML scalar, also `1e6` for an int (= 1000000), `1e-3` for a float, 0/1 for a bool;
  list / tuple: a YAML list or comma-separated text (`threads=1,2`), elements typed like the default's;
  None default without a type: anything YAML (`keep_fp32=[proj, softmax]`); `key=` or `key=null` sets None.
Mappings are reached with dotted keys (`loss.alpha=20`). `open_keys` names the mappings whose
children are free (any key, any YAML value); a command needing free keys must list them there.
`shorthands` maps a mapping's key to a function that reads `key=text` as the `key.<child>` values
it stands for (`data=data/synth` -> data.format=synth data.root=data/synth, mcad.data.spec).

Ranges: a numeric key's range is declared by its last name (POSITIVE, NON_NEGATIVE, FRACTION below:
`lr`, `steps`, `batch_size`, `k`, `threads` > 0; `workers`, `seed`, `warmup`, loss weights >= 0), checked
for every `key=value` given and every value of a recipe, so `lr=-1` or `workers=-2` is one line naming
the key before any work. A top-level `name` (a run's folder below `out=`) may not be empty or leave `out=`.

A recipe may start from another: `base: student` at its top takes every key of student.yaml and
sets only those it names, which must be keys of the base (a typo in a shipped recipe is an error).
A key a recipe of the chain leaves null can be unset again (`data.json=null`); a `data.format` given
on the command line leaves out the recipe's data keys of its own format (mcad.data.spec.rebase).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml

from mcad.config_values import (NAME_OR_MAPPING, ConfigError, check_ranges, check_value,  # noqa: F401
                                coerce, name_or_mapping, parse_value, type_of)
from mcad.ranges import FRACTION, NON_NEGATIVE, POSITIVE  # noqa: F401

Shorthands = dict[str, typing.Callable[[str], dict]]
CONFIG_DIR = Path(__file__).parent / "configs"
# `key=value`: a key starts like an identifier; anything else (a query text, a path) is positional
KEY_VALUE = re.compile(r"^[A-Za-z_][\w.]*=")


# -- YAML recipes ------------------------------------------------------------------------------------
def resolve_config_path(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.is_file():  # a file, not a folder that happens to share the recipe's name (`export/`)
        return p
    for cand in (CONFIG_DIR / f"{name_or_path}.yaml", CONFIG_DIR / str(name_or_path)):
        if cand.is_file():
            return cand
    known = ", ".join(sorted(q.stem for q in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"{name_or_path}: no such config file or registered recipe (known: {known})")


def read_yaml(name_or_path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    path = resolve_config_path(name_or_path)
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    base = cfg.pop("base", None)
    if base is not None:
        if path.resolve() in _seen:
            raise ConfigError(f"{path}: base: {base} leads back to this recipe")
        sibling = path.parent / f"{base}.yaml"  # a recipe beside this one first, then a registered one
        cfg = inherit(read_yaml(sibling if sibling.is_file() else base, (*_seen, path.resolve())), cfg, path)
    return cfg


def inherit(base: dict, child: dict, path: Path, prefix: str = "") -> dict:
    """`base` with `child`'s values; every key of `child` must be one of `base` (mappings merge)."""
    out = copy.deepcopy(base)
    for k, v in child.items():
        if k not in base:
            raise ConfigError(f"{path}: {unknown(prefix + str(k), _keys(base, prefix))}")
        out[k] = inherit(base[k], v, path, f"{prefix}{k}.") if isinstance(base[k], dict) and isinstance(v, dict) \
            else copy.deepcopy(v)
    return out


def load_config(name_or_path: str | Path, overrides: list[str] | None = None, *, extra: dict | None = None,
                open_keys: Iterable[str] = (), shorthands: Shorthands | None = None) -> dict:
    """The recipe's YAML with `overrides` applied, strictly: the YAML is the schema. `extra`: keys a
    command reads besides the recipe's (with their defaults), e.g. the ablation's `seeds`."""
    cfg = read_yaml(name_or_path)
    for k, v in (extra or {}).items():
        cfg.setdefault(k, v)
    check_ranges(cfg, where=str(resolve_config_path(name_or_path)))
    items = expand_shorthands(overrides or [], shorthands)
    out = apply_overrides(cfg, items, open_keys=open_keys, types=nullable_types(name_or_path, cfg))
    given = {item.partition("=")[0].strip() for item in items}
    if "data.format" in given and isinstance(cfg.get("data"), dict) and isinstance(out.get("data"), dict):
        from mcad.data.spec import rebase  # the recipe's data keys of another format go with it

        out["data"] = rebase(cfg["data"], out["data"], {k.split(".", 1)[1] for k in given if k.startswith("data.")})
    return out


def nullable_types(name_or_path: str | Path, cfg: dict) -> dict[str, Any]:
    """{dotted key: Optional[type]} of the keys a recipe of the base chain leaves null (student.yaml's
    `data.json: null`) and a recipe above it sets: `key=null` (or `key=`) unsets them again."""
    out: dict[str, Any] = {}
    path, seen = resolve_config_path(name_or_path), set()
    while path.resolve() not in seen:  # read_yaml has read (and checked) the chain already
        seen.add(path.resolve())
        raw = yaml.safe_load(path.read_text()) or {}
        for key in _null_keys(raw):
            value = get(cfg, key)
            if value is not None and not isinstance(value, dict):
                out[key] = typing.Optional[type_of(value)]
        if raw.get("base") is None:
            break
        sibling = path.parent / f"{raw['base']}.yaml"
        path = sibling if sibling.is_file() else resolve_config_path(raw["base"])
    return out


def _null_keys(cfg: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in cfg.items():
        if isinstance(v, dict):
            out += _null_keys(v, f"{prefix}{k}.")
        elif v is None:
            out.append(f"{prefix}{k}")
    return out


def load_command_config(argv: list[str], default_recipe: str, **kw) -> dict:
    """`mcad <cmd> [recipe] key=value ...`: the one positional names the recipe (default
    `default_recipe`), the rest are overrides checked against it."""
    pos, items, _ = split_argv(argv)
    if len(pos) > 1:
        raise ConfigError(f"one recipe at most, got {', '.join(map(repr, pos))} (other arguments are key=value)")
    return load_config(pos[0] if pos else default_recipe, items, **kw)


# -- the command line ----------------------------------------------------------------------------------
@dataclass
class Parsed:
    positional: list[str]
    config: dict                  # the defaults with the overrides applied
    given: dict[str, Any]         # dotted key -> value, only what the command line set
    flags: set[str]


def split_argv(argv: Iterable[str], flags: Iterable[str] = ()) -> tuple[list[str], list[str], set[str]]:
    """-> (positionals, `key=value` items, `--flag`s seen). An unknown `-x`/`--flag` is an error."""
    flags = tuple(flags)
    pos, items, seen = [], [], set()
    for a in argv:
        if KEY_VALUE.match(a):
            items.append(a)
        elif a.startswith("-") and len(a) > 1:
            name = a.lstrip("-")
            if name not in flags:
                raise unknown(a, [f"--{f}" for f in flags], what="flag")
            seen.add(name)
        else:
            pos.append(a)
    return pos, items, seen


def parse_overrides(argv: Iterable[str], defaults: Any, *, positional: int = 0, flags: Iterable[str] = (),
                    open_keys: Iterable[str] = (), types: dict[str, Any] | None = None,
                    shorthands: Shorthands | None = None) -> Parsed:
    """`pos ... key=value ... --flag` against `defaults` (a dict, a dataclass type or instance).

    `types`: the type of keys whose default is None (`{"run": str, "runs": int}`); a dataclass's
    annotations give them for its fields. At most `positional` positionals."""
    schema, hints = schema_of(defaults)
    hints.update(types or {})
    pos, items, seen = split_argv(argv, flags)
    if len(pos) > positional:
        extra = pos[positional:]
        raise ConfigError(f"{extra[0]!r}: expected key=value" if positional == 0 else
                          f"too many positional arguments: {', '.join(map(repr, extra))} (options are key=value)")
    items = expand_shorthands(items, shorthands)
    cfg = apply_overrides(schema, items, open_keys=open_keys, types=hints)
    given = {}
    for item in items:
        key = item.split("=", 1)[0].strip()
        given[key] = get(cfg, key)
    return Parsed(pos, cfg, given, seen)


def schema_of(defaults: Any) -> tuple[dict, dict[str, Any]]:
    """(default values, {key: type} from a dataclass's annotations) of a dict or dataclass."""
    if dataclasses.is_dataclass(defaults):
        cls = defaults if isinstance(defaults, type) else type(defaults)
        hints = typing.get_type_hints(cls)
        values = {}
        for f in dataclasses.fields(cls):
            if not isinstance(defaults, type):
                values[f.name] = getattr(defaults, f.name)
            elif f.default is not dataclasses.MISSING:
                values[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                values[f.name] = f.default_factory()
            else:
                values[f.name] = None
        return values, {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    if not isinstance(defaults, dict):
        raise TypeError(f"defaults must be a dict or a dataclass, not {type(defaults).__name__}")
    return dict(defaults), {}


def expand_shorthands(items: list[str], shorthands: Shorthands | None) -> list[str]:
    """`key=text` of a key in `shorthands` -> the `key.<child>=<value>` items it stands for, in place
    (so a later `key.<child>=...` still overrides one of them)."""
    if not shorthands:
        return list(items)
    out = []
    for item in items:
        key, sep, text = item.partition("=")
        expand = shorthands.get(key.strip()) if sep else None
        out += [f"{key.strip()}.{k}={'' if v is None else v}" for k, v in expand(text).items()] if expand else [item]
    return out


def apply_overrides(cfg: dict, overrides: list[str], *, open_keys: Iterable[str] = (),
                    types: dict[str, Any] | None = None, shorthands: Shorthands | None = None) -> dict:
    """A copy of `cfg` with each `key=value` applied; a key must already be in `cfg` (or under one
    of `open_keys`), and its value must fit the default's type (or `types[key]`)."""
    cfg = copy.deepcopy(cfg)
    open_keys, types = set(open_keys), types or {}
    for item in expand_shorthands(overrides, shorthands):
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"{item!r}: expected key=value")
        node, leaf, is_open = _locate(cfg, key, open_keys)
        if key in NAME_OR_MAPPING and leaf in node:
            node[leaf] = name_or_mapping(key, text)
            continue
        if is_open and leaf not in node:
            node[leaf] = parse_value(text)
            continue
        default = node[leaf]
        if isinstance(default, dict) and key not in types:
            if key not in open_keys:
                first = next(iter(default), "key")
                raise ConfigError(f"{key}: a mapping; set its keys ({key}.{first}=...)")
            value = parse_value(text)
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping, got {text!r}")
            node[leaf] = value
            continue
        node[leaf] = coerce(key, text, types.get(key, type_of(default)), optional=default is None)
        check_value(key, node[leaf], text)
    return cfg


def _locate(cfg: dict, key: str, open_keys: set[str]) -> tuple[dict, str, bool]:
    """(the mapping holding `key`'s last part, that part, whether the mapping is open)."""
    parts = key.split(".")
    node, path = cfg, []
    for part in parts[:-1]:
        path.append(part)
        here = ".".join(path)
        if part not in node:
            if _is_open(path[:-1], open_keys):
                node[part] = {}
            else:
                raise unknown(here, _keys(cfg))
        if node[part] is None and _is_open(path, open_keys):
            node[part] = {}
        if not isinstance(node[part], dict):
            raise ConfigError(f"{here}: not a mapping, so {key} cannot be set (set {here}=...)")
        node = node[part]
    is_open = _is_open(parts[:-1], open_keys)
    if parts[-1] not in node and not is_open:
        raise unknown(key, _keys(cfg))
    return node, parts[-1], is_open


def _is_open(path: list[str], open_keys: set[str]) -> bool:
    """A mapping is open when it, or a mapping above it, is in `open_keys`."""
    return any(".".join(path[:i]) in open_keys for i in range(1, len(path) + 1))


def _keys(cfg: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in cfg.items():
        out.append(prefix + str(k))
        if isinstance(v, dict):
            out += _keys(v, f"{prefix}{k}.")
    return out


def unknown(key: str, valid: Iterable[str], what: str = "key") -> ConfigError:
    """`stpes: unknown key; did you mean steps?` (or the valid keys when none is close)."""
    valid = list(valid)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if close:
        return ConfigError(f"{key}: unknown {what}; did you mean {close[0]}?")
    top = [v for v in valid if "." not in v] or valid
    return ConfigError(f"{key}: unknown {what} (valid: {', '.join(top) or 'none'})")


def get(cfg: dict, dotted: str, default: Any = None) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node
