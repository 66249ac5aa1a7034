"""`mcad data`: make the synthetic benchmark and prove its ceiling, or check any data set.

    mcad data [out=data/synth] [seed=0] [n_train=20000] [n_val=500] [n_test=1000] [force=true]
              [n_distill=0 distill_captions=5 web_partial=0.0 web_wrong=0.0] [templates=default|heldout]
        Generates the benchmark unless out/dataset_synth.json exists (force=true regenerates), then
        writes and prints out/ceiling.json (ceiling_check of test and val + split sizes). n_distill > 0
        adds a `distill` split with web-like captions (exact shares partial / wrong; its measured
        kinds go in ceiling.json under `web`); templates=heldout words every split anew.
    mcad data check [format=synth|karpathy|csv|wds] [split=test] [decode=false] [size=64] <spec keys>
        Loads one split in any format (see `mcad.data`) and prints counts and the LoadReport
        summary as JSON; decode=true also decodes every image (wds always does).
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from mcad.config import parse_overrides, unknown

log = logging.getLogger("mcad.data")

GEN_DEFAULTS = {"out": "data/synth", "seed": 0, "n_train": 20000, "n_val": 500, "n_test": 1000,
                "image_size": 64, "captions_per_image": 5, "force": False, "progress": True,
                # issue 15: a distillation split with web-like captions, and held-out wording
                "n_distill": 0, "distill_captions": 5, "web_partial": 0.0, "web_wrong": 0.0,
                "templates": "default"}
# what `generate` takes besides out/force and what an existing benchmark is compared on
_GEN_KEYS = ("seed", "n_train", "n_val", "n_test", "image_size", "captions_per_image", "progress",
             "n_distill", "distill_captions", "web_partial", "web_wrong", "templates")
_COMPARED = ("seed", "n_train", "n_val", "n_test", "image_size", "n_distill", "distill_captions",
             "web_partial", "web_wrong", "templates")
_GENERATED_NAME = re.compile(r"^(train|val|test|distill)_\d{6}\.png$")


def check_defaults() -> dict:
    """`mcad data check` keys: its own, then every format's spec keys (None: not given; YAML values,
    since a path may be given per split: `json={train: a.json, test: b.json}`)."""
    from mcad.data.spec import FORMATS, KEY_ALIASES

    spec = {k: None for rules in FORMATS.values() for k in (*rules["required"], *rules["optional"])}
    spec.update({k: None for aliases in KEY_ALIASES.values() for k in aliases})  # csv's `path=`, as before
    return {"format": "synth", "split": "test", "decode": False, "size": None, **spec}


def parse_args(argv: list[str], defaults: dict | None = None) -> dict:
    """The keys given on the command line, checked and typed against `defaults` (`mcad data`'s
    generator options unless told): only those, so an existing benchmark is checked against what
    was asked, not against the defaults."""
    return parse_overrides(argv, GEN_DEFAULTS if defaults is None else defaults, types={"size": int}).given


def split_sizes(json_path: Path) -> dict:
    data = json.loads(json_path.read_text())
    sizes: dict[str, dict[str, int]] = {}
    for e in data.get("images", []):
        s = sizes.setdefault(e.get("split", "?"), {"images": 0, "captions": 0})
        s["images"] += 1
        s["captions"] += len(e.get("sentences", []))
    return sizes


def _check_existing(json_path: Path, asked: dict) -> None:
    """An existing benchmark that contradicts what was explicitly asked for is an error, not a
    silent reuse."""
    data = json.loads(json_path.read_text())
    sizes = split_sizes(json_path)
    web = data.get("web") or {}  # absent: written without a distillation split (or before it existed)
    have = {"seed": data.get("seed"), "image_size": data.get("image_size"),
            "n_train": sizes.get("train", {}).get("images", 0) + sizes.get("restval", {}).get("images", 0),
            "n_val": sizes.get("val", {}).get("images", 0), "n_test": sizes.get("test", {}).get("images", 0),
            "n_distill": sizes.get("distill", {}).get("images", 0),
            "distill_captions": web.get("distill_captions", GEN_DEFAULTS["distill_captions"]),
            "web_partial": web.get("web_partial", 0.0), "web_wrong": web.get("web_wrong", 0.0),
            "templates": data.get("templates", "default")}
    diff = [f"{k}={have[k]} (asked {asked[k]})" for k in have if k in asked and have[k] != asked[k]]
    if diff:
        raise ValueError(f"{json_path}: exists with {', '.join(diff)}; pass force=true to regenerate "
                         f"or choose another out=")


def _remove_stale_images(out: Path, json_path: Path) -> int:
    data = json.loads(json_path.read_text())
    keep = {e["filename"] for e in data["images"]}
    n = 0
    for p in (out / "images").glob("*.png"):
        if _GENERATED_NAME.match(p.name) and p.name not in keep:
            p.unlink()
            n += 1
    return n


def make_synthetic(args: dict) -> dict:
    from mcad.data.spec import synth_json
    from mcad.data.synthetic import ceiling_check, generate, web_check
    from mcad.io import write_json

    for k in args:  # callers that pass a dict, not argv
        if k not in GEN_DEFAULTS:
            raise unknown(k, GEN_DEFAULTS)
    cfg = {**GEN_DEFAULTS, **args}
    out = Path(str(cfg["out"]))
    json_path = synth_json(out)
    if json_path.exists() and not cfg["force"]:
        _check_existing(json_path, {k: v for k, v in args.items() if k in _COMPARED})
        log.info("%s exists; reusing it (force=true regenerates)", json_path)
        generated = False
    else:
        generate(out, **{k: cfg[k] for k in _GEN_KEYS})
        stale = _remove_stale_images(out, json_path)
        if stale:
            log.info("removed %d stale images of an earlier benchmark from %s", stale, out / "images")
        generated = True
    sizes = split_sizes(json_path)
    data = json.loads(json_path.read_text())
    result = {"dataset": str(json_path), "generated": generated, "seed": data.get("seed"),
              "image_size": data.get("image_size"), "splits": sizes,
              "ceiling": {s: ceiling_check(json_path, s) for s in ("test", "val") if s in sizes}}
    if "distill" in sizes:  # the stated shares, measured on the files
        result["web"] = web_check(json_path)
    write_json(out / "ceiling.json", result)
    return result


def check(args: dict) -> dict:
    from mcad.data import load_corpus, load_pixels

    args = dict(args)
    split = str(args.pop("split", "test"))
    decode = bool(args.pop("decode", False))
    size = args.pop("size", None)
    spec = {"format": args.pop("format", "synth"), **args}
    if spec["format"] == "wds" or decode:
        pixels, corpus = load_pixels(spec, split, size=size)
        decoded = {"decoded": True, "pixels_shape": list(pixels.shape)}
    else:
        corpus = load_corpus(spec, split)
        decoded = {"decoded": False}
    per_image = [len(c) for c in corpus.image_captions()]
    return {"format": spec["format"], "name": corpus.name, "split": split, "images": corpus.n_images,
            "captions": corpus.n_captions,
            "captions_per_image": {"min": min(per_image), "max": max(per_image),
                                   "mean": round(sum(per_image) / len(per_image), 3)},
            **decoded, "report": corpus.report.summary()}


def main(argv: list[str]) -> int:
    argv = list(argv)
    if argv and argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0
    if argv and argv[0] == "check":
        result = check(parse_args(argv[1:], check_defaults()))
        print(json.dumps(result, indent=2))
        return 0
    result = make_synthetic(parse_args(argv))
    print(json.dumps(result, indent=2))
    bad = [s for s, c in result["ceiling"].items() if c["captions_not_matching_own_scene"] or
           c["unique_descriptions"] != c["images"]]
    if bad:
        log.error("ceiling check failed for split(s) %s", ", ".join(bad))
        return 1
    return 0
