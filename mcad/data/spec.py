"""The data spec: which data set a command reads. The one place a spec becomes a `Corpus` (and pixels).

Every command that trains or evaluates takes the same `data.*` keys (declared in
mcad/configs/student.yaml and teachers.yaml, checked here):

  data.format=synth     data.root=data/synth            the synthetic set `mcad data` writes (default)
  data.format=karpathy  data.json=dataset_flickr30k.json [data.image_root=<json folder>/images]
  data.format=csv       data.csv=train.csv [data.image_root=<csv folder>] [data.img_key= data.caption_key= data.sep=]
  data.format=wds       data.shards='shards/train-{000..009}.tar'
  data.max_images=N     the first N images of each split (quick runs)
  data.pixel_cache=DIR  keep decoded pixels there (default: the synthetic root; none for the other formats)

`data=PATH` is short for the format its path shows: a folder is a synthetic root, `*.json` a Karpathy
file, `*.csv`/`*.tsv` a CSV, `*.tar` or a brace pattern webdataset shards. Karpathy files hold their
splits; a CSV or shard path holds one split, so per split give a mapping
(`data.csv={train: train.csv, test: test.csv}`); a single path serves every split asked for, except
to an evaluation, which takes it only with the split named (`check_eval_split`). A recipe's data keys
of another format than the one the command line gives are left out (`rebase`, from mcad.config).

Loaders import lazily, so importing this module stays light (no torch, no webdataset).
"""
from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger("mcad.data")

SYNTH_JSON = "dataset_synth.json"  # the synthetic set's Karpathy file, inside its root
DEFAULT_SYNTH_ROOT = "data/synth"
DEFAULT_WDS_SIZE = 64
# format -> the keys it reads (besides `format`), the required ones first
FORMATS: dict[str, dict[str, tuple[str, ...]]] = {
    "karpathy": {"required": ("json",), "optional": ("image_root", "max_images", "pixel_cache")},
    "csv": {"required": ("csv",),
            "optional": ("image_root", "img_key", "caption_key", "sep", "max_images", "name", "pixel_cache")},
    "wds": {"required": ("shards",), "optional": ("image_size", "max_samples", "max_images", "name")},
    "synth": {"required": (), "optional": ("root", "image_root", "max_images", "pixel_cache")},
}
ALIASES = {"synthetic": "synth"}           # format names of the loader-level API (`mcad data check`)
KEY_ALIASES = {"csv": {"path": "csv"}}      # csv's file was `path` there
# The `data:` mapping of the command recipes: every key any format reads (None: not given).
DATA_DEFAULTS: dict[str, Any] = {"format": "synth", "root": None, "json": None, "image_root": None, "csv": None,
                                 "shards": None, "img_key": None, "caption_key": None, "sep": None,
                                 "max_images": None, "pixel_cache": None}
SPLIT_KEYS = ("root", "json", "image_root", "csv", "shards")  # may be given per split as a mapping


@dataclass(frozen=True)
class DataSpec:
    """A checked data spec: its format and the keys given (None-valued keys dropped)."""
    format: str
    args: dict = field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        return self.args.get(key, default)

    def describe(self) -> Any:
        """One value saying which data this is, for records and messages: the root folder for the
        synthetic set (what `data=` was before specs, so records of the embedded default read as
        they did), else `data.format=... data.<key>=...` as a command line would give it."""
        if self.format == "synth" and set(self.args) <= {"root"}:
            return str(self.args.get("root") or DEFAULT_SYNTH_ROOT)
        return " ".join([f"data.format={self.format}"] + [f"data.{k}={_text(v)}" for k, v in sorted(self.args.items())])

    def is_default_synth(self) -> bool:
        return self.format == "synth" and set(self.args) <= {"root"}


def _text(v: Any) -> str:
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{k}: {v[k]}" for k in v) + "}"
    return str(v)


# -- the spec --------------------------------------------------------------------------------------
def infer(path: str) -> dict[str, Any]:
    """`data=PATH` -> the spec keys its path shows (see the module doc)."""
    p = str(path)
    low = p.lower()
    if low.endswith(".json"):
        return {"format": "karpathy", "json": p}
    if low.endswith((".csv", ".tsv", ".tab")):
        return {"format": "csv", "csv": p}
    if low.endswith(".tar") or "{" in p:
        return {"format": "wds", "shards": p}
    return {"format": "synth", "root": p}


def shorthand(value: str) -> dict[str, Any]:
    """`data=PATH` as the `data.<key>` overrides it stands for (mcad.config `shorthands`)."""
    return infer(value)


def parse(spec: Any, where: str = "data") -> DataSpec:
    """A recipe's `data` (a mapping of DATA_DEFAULTS' keys, the loader-level dict, or a path) -> a
    checked DataSpec. Keys another format reads, unknown keys and missing required keys are one line
    naming the key and the fix."""
    if isinstance(spec, DataSpec):
        return spec
    if isinstance(spec, (str, Path)):
        spec = infer(str(spec))
    if not isinstance(spec, Mapping):
        raise ValueError(f"{where}: a data spec is a mapping with a 'format' key or a path, got {type(spec).__name__}")
    fmt = ALIASES.get(spec.get("format") or "synth", spec.get("format") or "synth")
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {spec.get('format')!r} (valid: {', '.join(FORMATS)}); "
                         f"set {where}.format")
    rules, aliases = FORMATS[fmt], KEY_ALIASES.get(fmt, {})
    args = {aliases.get(k, k): v for k, v in spec.items() if k != "format" and v is not None}
    reads = (*rules["required"], *rules["optional"])
    for key in sorted(set(args) - set(reads)):
        owners = [f for f, r in FORMATS.items() if key in (*r["required"], *r["optional"])]
        if owners:
            raise ValueError(f"{where}.{key}: not read by {where}.format={fmt} (it is a key of "
                             f"{' / '.join(owners)}): set {where}.format={owners[0]}, or leave {where}.{key} out")
        close = difflib.get_close_matches(key, reads, n=1, cutoff=0.6)
        raise ValueError(f"{where}.{key}: unknown key for {where}.format={fmt}"
                         + (f"; did you mean {where}.{close[0]}?" if close else f" (valid: {', '.join(reads)})"))
    missing = [k for k in rules["required"] if args.get(k) in (None, "")]
    if missing:
        raise ValueError(f"{where}.format={fmt}: needs {', '.join(f'{where}.{k}' for k in missing)}")
    for key in ("max_images", "max_samples", "image_size"):
        if key in args:
            from mcad.checks import integer

            args[key] = integer(args[key], f"{where}.{key}", 1)
    return DataSpec(fmt, args)


def rebase(recipe: Mapping, data: dict, given: set[str]) -> dict:
    """The `data:` mapping of a recipe whose format the command line changed (`flickr30k
    data.format=csv data.csv=...`): the recipe's keys that place its own files (SPLIT_KEYS) or that
    the new format does not read are dropped, logged; keys in `given` (set on the command line) stay,
    so one the new format does not read is still refused by `parse`."""
    def norm(fmt: Any) -> str:
        return ALIASES.get(fmt or "synth", fmt or "synth")

    new = norm(data.get("format"))
    if new == norm(recipe.get("format")) or new not in FORMATS:
        return data
    reads = {*FORMATS[new]["required"], *FORMATS[new]["optional"]}
    dropped = [k for k, v in recipe.items() if k != "format" and k not in given and v is not None
               and data.get(k) == v and (k in SPLIT_KEYS or k not in reads)]
    if dropped:
        log.info("data.format=%s: the recipe's %s (data.format=%s) left out; give them again to keep them",
                 new, ", ".join(f"data.{k}={_text(recipe[k])}" for k in dropped), norm(recipe.get("format")))
    return {**data, **dict.fromkeys(dropped)}


def per_split(spec: DataSpec, key: str, split: str, default: Any = None) -> Any:
    """A value given per split (`{train: a.csv, test: b.csv}`) -> the one for `split`."""
    value = spec.get(key, default)
    if isinstance(value, Mapping):
        if split not in value:
            raise ValueError(f"data.{key} has no entry for split {split!r} (has: {', '.join(map(str, value))}); "
                             f"add it: data.{key}={{{', '.join(f'{s}: ...' for s in [*value, split])}}}")
        return value[split]
    return value


def single_file(spec: DataSpec) -> tuple[str, str] | None:
    """(key, path) of a CSV or shard path given once for every split (`data=train.csv`), else None:
    Karpathy and synthetic files hold their splits, and a per-split mapping names each split's file."""
    key = {"csv": "csv", "wds": "shards"}.get(spec.format)
    value = spec.get(key) if key else None
    return None if value is None or isinstance(value, Mapping) else (key, str(value))


def check_eval_split(spec: Any, split: str, split_key: str, named: bool) -> None:
    """An evaluation over one file that serves every split would score whatever rows it holds
    (often the training rows) as `split`: refused unless the command line names the split."""
    if not named:
        _refuse_one_file(spec, split, f"evaluating it as split {split!r} may score training rows",
                         f" or say which split this file is ({split_key}={split})")


def check_train_and_eval_files(spec: Any, split: str) -> None:
    """A command that trains on one split and evaluates on another must read two sets of rows: one
    file given for every split would report its training rows as the `split` metrics."""
    _refuse_one_file(spec, split, f"the {split} metrics would score the training rows")


def _refuse_one_file(spec: Any, split: str, why: str, alternative: str = "") -> None:
    one = single_file(parse(spec))
    if one is not None:
        key, path = one
        raise ValueError(f"data.{key}={path}: one file serves every split, so {why}; give each split its own file "
                         f"(data.{key}={{train: ..., {split}: ...}}){alternative}")


def split_record(corpus, spec: Any) -> dict:
    """What an evaluation read, for its output and records: the split, its file(s), its size."""
    return {"split": corpus.split, "source": corpus.report.source, "images": corpus.n_images,
            "captions": corpus.n_captions, "data": parse(spec).describe()}


def split_line(record: dict) -> str:
    return (f"split {record['split']}: {record['source']} ({record['images']} images, "
            f"{record['captions']} captions)")


def synth_json(root: str | Path) -> Path:
    """The synthetic set's Karpathy file under its root."""
    return Path(root) / SYNTH_JSON


# -- spec -> Corpus / pixels --------------------------------------------------------------------------
def load_corpus(spec: Any, split: str = "test", split_key: str | None = None):
    """One split of a data set as a `Corpus` (for `wds`, images are decoded to validate them; use
    `load_pixels` to keep them). A split with nothing usable is one line naming the file and the fix."""
    spec = parse(spec)
    try:
        return _load_corpus(spec, split)
    except ValueError as e:
        from mcad.data.corpus import EmptySplit

        if isinstance(e, EmptySplit):
            raise EmptySplit(f"{e} {_empty_fix(spec, split, split_key)}") from None
        raise


def _load_corpus(spec: DataSpec, split: str):
    if spec.format == "wds":
        return _load_wds(spec, split, int(spec.get("image_size") or DEFAULT_WDS_SIZE))[1]
    if spec.format in ("karpathy", "synth"):
        from mcad.data.karpathy import load_karpathy

        if spec.format == "synth":
            json_path = synth_json(per_split(spec, "root", split, DEFAULT_SYNTH_ROOT))
        else:
            json_path = per_split(spec, "json", split)
        image_root = per_split(spec, "image_root", split)
        return load_karpathy(json_path, image_root, split=split, max_images=spec.get("max_images"))
    from mcad.data.csv_data import load_csv

    return load_csv(per_split(spec, "csv", split), per_split(spec, "image_root", split), split=split,
                    img_key=spec.get("img_key"), caption_key=spec.get("caption_key"), sep=spec.get("sep"),
                    max_images=spec.get("max_images"), name=spec.get("name"))


def _empty_fix(spec: DataSpec, split: str, key: str | None = None) -> str:
    """How to get a usable split: another split (by the command's own key, when it takes one), or
    for a CSV/shards spec the split's own file."""
    if spec.format in ("karpathy", "synth"):
        json_path = synth_json(per_split(spec, "root", split, DEFAULT_SYNTH_ROOT)) if spec.format == "synth" \
            else Path(per_split(spec, "json", split))
        have = _karpathy_splits(json_path)
        others = [s for s in ("test", "val", "train") if s != split and have.get(s)]
        listed = ", ".join(f"{k} {v}" for k, v in have.items()) or "none"
        return (f"(its images per split: {listed}; Karpathy splits are train/restval, val, test"
                + ((f": choose another, e.g. {key}={others[0]})" if key else f": choose another, e.g. {others[0]})")
                   if others else ")"))
    key = "csv" if spec.format == "csv" else "shards"
    splits = dict.fromkeys(["train", split])  # (train once when it is the split asked for)
    return f"(give the {split} split its own file: data.{key}={{{', '.join(f'{s}: ...' for s in splits)}}})"


def _karpathy_splits(json_path: Path) -> dict[str, int]:
    """Images per `split` field of a Karpathy file (for the message of an empty split)."""
    import json
    from collections import Counter

    try:
        images = json.loads(json_path.read_text(encoding="utf-8")).get("images") or []
    except (OSError, ValueError, AttributeError):
        return {}
    return dict(Counter(str(e.get("split")) for e in images if isinstance(e, dict)))


def _load_wds(spec: DataSpec, split: str, size: int):
    from mcad.data.corpus import EmptySplit
    from mcad.data.wds import load_wds

    limit = spec.get("max_samples") or spec.get("max_images")
    try:
        return load_wds(per_split(spec, "shards", split), size, split=split, max_samples=limit, name=spec.get("name"))
    except EmptySplit as e:
        raise EmptySplit(f"{e} {_empty_fix(spec, split)}") from None


def pixel_cache_dir(spec: DataSpec, split: str) -> Path | None:
    """Where decoded pixels are kept: `data.pixel_cache`, else beside the synthetic set (as before
    specs); real data sets are decoded per run unless told (a 224 px Flickr30K is ~4.7 GB)."""
    if spec.get("pixel_cache"):
        return Path(spec.get("pixel_cache"))
    if spec.format == "synth":
        return Path(per_split(spec, "root", split, DEFAULT_SYNTH_ROOT))
    return None


def load_pixels(spec: Any, split: str = "test", size: int | None = None, cache_dir=None,
                progress: bool = False):
    """(pixels uint8 [N, 3, size, size], Corpus) for any format; unreadable images are reported and
    dropped with their captions. `size` defaults to the spec's `image_size` (wds) or 64; `cache_dir`
    to `pixel_cache_dir` only when asked for with `cache_dir=True`."""
    spec = parse(spec)
    size = int(size or spec.get("image_size") or DEFAULT_WDS_SIZE)
    if spec.format == "wds":
        return _load_wds(spec, split, size)
    from mcad.data.images import load_images

    if cache_dir is True:
        cache_dir = pixel_cache_dir(spec, split)
    return load_images(load_corpus(spec, split), size, cache_dir=cache_dir, progress=progress)


def load_split(spec: Any, split: str, size: int, progress: bool = True):
    """(pixels uint8 [N,3,size,size], Corpus) of one split, decoded whole at `size`, through the pixel
    cache where the spec keeps one (small sets and tests; the commands stream with `open_split`)."""
    return load_pixels(spec, split, size, cache_dir=True, progress=progress)


def open_split(spec: Any, split: str, view, workers: int | None = None, progress: bool = True,
               split_key: str | None = None):
    """What every training and evaluation command reads: (mcad.data.stream.Images, Corpus) of one
    split as `view` (a model's size and resize rule) says. Image files and webdataset members are
    decoded when a command asks for them, by `workers` DataLoader processes (None: one per spare
    CPU); nothing holds the split's pixels. Where the spec keeps a pixel cache (the synthetic set,
    or `data.pixel_cache`), the split is decoded once into it and served from memory: at the
    synthetic set's 64 px the whole train split is 245 MB, and indexing it costs less per step than
    shipping a batch from a worker."""
    from mcad.data.stream import ArrayImages, View, default_workers, open_images

    spec = parse(spec)
    view = view if isinstance(view, View) else View(int(view))
    cache = pixel_cache_dir(spec, split)
    if cache is not None:
        from mcad.data.images import load_images

        pixels, corpus = load_images(load_corpus(spec, split, split_key), view.size, cache_dir=cache, progress=progress,
                                     view=view)
        return ArrayImages(pixels, view), corpus
    if spec.format == "wds":
        from mcad.data.wds import index_wds

        limit = spec.get("max_samples") or spec.get("max_images")
        try:
            corpus = index_wds(per_split(spec, "shards", split), split=split, max_samples=limit, name=spec.get("name"))
        except ValueError as e:
            from mcad.data.corpus import EmptySplit

            if isinstance(e, EmptySplit):
                raise EmptySplit(f"{e} {_empty_fix(spec, split, split_key)}") from None
            raise
    else:
        corpus = load_corpus(spec, split, split_key)
    images, corpus = open_images(corpus, view, default_workers() if workers is None else int(workers), progress)
    if not len(images):
        from mcad.data.corpus import EmptySplit

        raise EmptySplit(f"{corpus.report.source}: no readable image in split '{split}' "
                         f"({len(corpus.report.problems)} rows skipped) {_empty_fix(spec, split, split_key)}")
    return images, corpus
