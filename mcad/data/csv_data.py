"""CSV/TSV of image path + caption: the format of open_clip's `CsvDataset` (`--csv-img-key`,
`--csv-caption-key`, `--csv-separator`).

A header row names the columns; the image column (`img_key`, default `filepath`) holds a path
relative to `image_root` (default: the CSV's folder) or an absolute one; the caption column
(`caption_key`, default `caption`, else open_clip's `title`) holds one caption. Several rows with
the same image become one image with several captions. The separator follows the extension
(`.tsv` -> tab, otherwise comma) unless given. Bad rows are reported as `file:line` and skipped.
"""
from __future__ import annotations

import csv
from pathlib import Path

from mcad.data.corpus import Corpus, DataError, LoadReport, clean_caption

DEFAULT_IMG_KEYS = ("filepath",)
DEFAULT_CAPTION_KEYS = ("caption", "title")


def _separator(path: Path, sep: str | None) -> str:
    if sep is not None:
        return {"\\t": "\t", "tab": "\t", "comma": ","}.get(sep, sep)
    return "\t" if path.suffix.lower() in (".tsv", ".tab") else ","


def _pick_column(header: list[str], key: str | None, defaults: tuple[str, ...], what: str, path: Path) -> int:
    wanted = (key,) if key is not None else defaults
    for k in wanted:
        if k in header:
            return header.index(k)
    raise DataError(f"{path}: no {what} column {' or '.join(repr(k) for k in wanted)} in header "
                    f"(columns: {', '.join(header) or 'none'})")


def load_csv(path: str | Path, image_root: str | Path | None = None, split: str = "train",
             img_key: str | None = None, caption_key: str | None = None, sep: str | None = None,
             max_images: int | None = None, name: str | None = None) -> Corpus:
    """Read a CSV/TSV of (image path, caption) rows into a `Corpus` (images in first-seen order,
    each image's captions together, in row order)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such CSV/TSV file")
    root = Path(image_root) if image_root is not None else path.parent
    delimiter = _separator(path, sep)
    report = LoadReport(str(path))
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return _read(f, path, root, delimiter, report, split, img_key, caption_key, max_images, name)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _read(f, path: Path, root: Path, delimiter: str, report: LoadReport, split: str,
          img_key: str | None, caption_key: str | None, max_images: int | None, name: str | None) -> Corpus:
    reader = csv.reader(f, delimiter=delimiter)
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise DataError(f"{path}: empty file (expected a header row)") from None
    except csv.Error as e:
        raise DataError(f"{path}: unreadable header ({e})") from None
    i_img = _pick_column(header, img_key, DEFAULT_IMG_KEYS, "image", path)
    i_cap = _pick_column(header, caption_key, DEFAULT_CAPTION_KEYS, "caption", path)

    by_image: dict[str, list[str]] = {}  # resolved image path -> captions, insertion-ordered
    exists: dict[str, bool] = {}
    n_rows = 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            n_rows += 1
            report.add(f"{path}:{reader.line_num}", f"malformed row ({e})")
            continue
        where = f"{path}:{reader.line_num}"
        if not row or all(not c.strip() for c in row):
            continue  # blank line
        n_rows += 1
        if len(row) != len(header):
            report.add(where, f"wrong column count: {len(row)} columns, header has {len(header)}")
            continue
        rel = row[i_img].strip()
        if not rel:
            report.add(where, "empty image path")
            continue
        cap = clean_caption(row[i_cap], where, report)
        if cap is None:
            continue
        p = Path(rel) if Path(rel).is_absolute() else root / rel
        key = str(p)
        if key not in exists:
            exists[key] = p.is_file()
        if not exists[key]:
            report.add(where, f"missing image: {p}")
            continue
        if key not in by_image:
            if max_images is not None and len(by_image) >= max_images:
                continue
            by_image[key] = []
        by_image[key].append(cap)
    report.log_summary()
    if n_rows == 0:
        raise DataError(f"{path}: header only, no data rows")
    paths, captions, c2i = [], [], []
    for idx, (img, caps) in enumerate(by_image.items()):
        paths.append(img)
        captions.extend(caps)
        c2i.extend([idx] * len(caps))
    return Corpus(name or path.stem, split, paths, captions, c2i, report)
