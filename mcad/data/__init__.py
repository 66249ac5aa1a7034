"""Data loaders behind one spec: `load_corpus({"format": ..., ...}, split)`.

Formats and their keys (paths may be given per split as a mapping, e.g. `{"train": a, "test": b}`):
  karpathy:  json, image_root (default: <json folder>/images), max_images
  csv:       path, image_root (default: the CSV's folder), img_key, caption_key, sep, max_images
  wds:       shards (brace pattern, path or list), image_size (default 64), max_samples
  synthetic: root (default data/synth), max_images  (Karpathy loader on root/dataset_synth.json)

Loaders import lazily, so `import mcad.data` stays light (no torch, no webdataset).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

FORMATS: dict[str, dict[str, Any]] = {
    # format -> {"required": (...), "optional": (...)}
    "karpathy": {"required": ("json",), "optional": ("image_root", "max_images")},
    "csv": {"required": ("path",),
            "optional": ("image_root", "img_key", "caption_key", "sep", "max_images", "name")},
    "wds": {"required": ("shards",), "optional": ("image_size", "max_samples", "name")},
    "synthetic": {"required": (), "optional": ("root", "image_root", "max_images")},
}
DEFAULT_SYNTH_ROOT = "data/synth"
DEFAULT_WDS_SIZE = 64


def _check_spec(spec: dict) -> tuple[str, dict]:
    if not isinstance(spec, dict):
        raise ValueError(f"data spec must be a mapping with a 'format' key, got {type(spec).__name__}")
    fmt = spec.get("format")
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r} (valid: {', '.join(FORMATS)})")
    rules = FORMATS[fmt]
    args = {k: v for k, v in spec.items() if k != "format"}
    missing = [k for k in rules["required"] if args.get(k) in (None, "")]
    if missing:
        raise ValueError(f"data format {fmt!r} needs {', '.join(missing)}")
    unknown = sorted(set(args) - set(rules["required"]) - set(rules["optional"]))
    if unknown:
        valid = ", ".join((*rules["required"], *rules["optional"]))
        raise ValueError(f"data format {fmt!r}: unknown key(s) {', '.join(unknown)} (valid: {valid})")
    return fmt, args


def _per_split(value: Any, split: str, key: str, fmt: str) -> Any:
    """A value given per split ({"train": ..., "test": ...}) -> the one for `split`."""
    if isinstance(value, dict):
        if split not in value:
            raise ValueError(f"data format {fmt!r}: {key} has no entry for split {split!r} "
                             f"(has: {', '.join(map(str, value))})")
        return value[split]
    return value


def load_corpus(spec: dict, split: str = "test"):
    """Load one split of a data set as a `Corpus` (for `wds`, images are decoded to validate them;
    use `load_pixels` to keep them)."""
    fmt, a = _check_spec(spec)
    if fmt == "wds":
        return load_pixels(spec, split)[1]
    if fmt in ("karpathy", "synthetic"):
        from mcad.data.karpathy import load_karpathy

        if fmt == "synthetic":
            root = Path(_per_split(a.get("root") or DEFAULT_SYNTH_ROOT, split, "root", fmt))
            json_path, image_root = root / "dataset_synth.json", a.get("image_root")
        else:
            json_path = _per_split(a["json"], split, "json", fmt)
            image_root = a.get("image_root")
        image_root = _per_split(image_root, split, "image_root", fmt) if image_root else None
        return load_karpathy(json_path, image_root, split=split, max_images=a.get("max_images"))
    from mcad.data.csv_data import load_csv

    image_root = a.get("image_root")
    return load_csv(_per_split(a["path"], split, "path", fmt),
                    _per_split(image_root, split, "image_root", fmt) if image_root else None,
                    split=split, img_key=a.get("img_key"), caption_key=a.get("caption_key"),
                    sep=a.get("sep"), max_images=a.get("max_images"), name=a.get("name"))


def load_pixels(spec: dict, split: str = "test", size: int | None = None, cache_dir=None,
                progress: bool = False):
    """(pixels uint8 [N, 3, size, size], Corpus) for any format; unreadable images are reported and
    dropped with their captions. `size` defaults to the spec's `image_size` (wds) or 64."""
    fmt, a = _check_spec(spec)
    size = int(size or a.get("image_size") or DEFAULT_WDS_SIZE)
    if fmt == "wds":
        from mcad.data.wds import load_wds

        return load_wds(_per_split(a["shards"], split, "shards", fmt), size, split=split,
                        max_samples=a.get("max_samples"), name=a.get("name"))
    from mcad.data.images import load_images

    return load_images(load_corpus(spec, split), size, cache_dir=cache_dir, progress=progress)
