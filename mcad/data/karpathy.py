"""Karpathy-split JSON (`dataset_flickr30k.json`, `dataset_coco.json`): the format of the Flickr30K
and COCO retrieval benchmarks, and the format the synthetic benchmark is written in."""
from __future__ import annotations

import json
from pathlib import Path

from mcad.data.corpus import Corpus, DataError, LoadReport, clean_caption, resolve_image

# "distill": the synthetic benchmark's distillation split with web-like captions (issue 15)
SPLIT_ALIASES = {"train": {"train", "restval"}, "val": {"val"}, "test": {"test"}, "distill": {"distill"}}


def entry_problem(entry: object) -> str | None:
    """What makes an `images` entry unreadable as such (wrong types crash later, or read wrongly)."""
    if not isinstance(entry, dict) or "filename" not in entry:
        return "entry without 'filename'"
    if not isinstance(entry["filename"], str) or not entry["filename"].strip() or "\x00" in entry["filename"]:
        return f"'filename' is not a file name ({entry['filename']!r:.60})"
    fp = entry.get("filepath")
    if fp is not None and (not isinstance(fp, str) or "\x00" in fp):
        return f"'filepath' is not a path ({fp!r:.60})"
    if not isinstance(entry.get("split"), (str, type(None))):
        return f"'split' is not text ({entry['split']!r:.60})"
    if not isinstance(entry.get("sentences"), (list, type(None))):
        return f"'sentences' is not a list ({type(entry['sentences']).__name__})"
    return None


def load_karpathy(json_path: str | Path, image_root: str | Path | None = None, split: str = "test",
                  max_images: int | None = None) -> Corpus:
    json_path = Path(json_path)
    if not json_path.exists():
        raise DataError(f"{json_path}: no such Karpathy JSON file")
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{json_path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{json_path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{json_path}: not a Karpathy split file (no top-level 'images' list)")
    if split not in SPLIT_ALIASES:
        raise DataError(f"{json_path}: unknown split {split!r} ({', '.join(SPLIT_ALIASES)})")
    root = Path(image_root) if image_root is not None else json_path.parent / "images"
    report = LoadReport(str(json_path))
    paths, captions, c2i, meta = [], [], [], []
    for k, entry in enumerate(data["images"]):
        where = f"{json_path}[images][{k}]"
        problem = entry_problem(entry)
        if problem:
            report.add(where, problem)
            continue
        if entry.get("split") not in SPLIT_ALIASES[split]:
            continue
        rel = str(Path(entry.get("filepath") or "") / entry["filename"])
        img = resolve_image(root, rel, f"{where} ({entry['filename']})", report)
        if img is None:
            continue
        caps = []
        for j, s in enumerate(entry.get("sentences") or []):
            raw = s.get("raw") if isinstance(s, dict) else s
            text = clean_caption(raw, f"{where}[sentences][{j}] ({entry['filename']})", report)
            if text is not None:
                caps.append(text)
        if not caps:
            report.add(f"{where} ({entry['filename']})", "image has no usable caption")
            continue
        idx = len(paths)
        paths.append(img)
        captions.extend(caps)
        c2i.extend([idx] * len(caps))
        meta.append({k2: v for k2, v in entry.items() if k2 not in ("sentences", "sentids")})
        if max_images is not None and len(paths) >= max_images:
            break
    report.log_summary()
    return Corpus(data.get("dataset", json_path.stem), split, paths, captions, c2i, report, meta)
