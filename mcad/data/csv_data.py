"""CSV/TSV of image path + caption: the format of open_clip's `CsvDataset` (`--csv-img-key`,
`--csv-caption-key`, `--csv-separator`).

A header row names the columns; the image column (`img_key`, default `filepath`) holds a path
relative to `image_root` (default: the CSV's folder) or an absolute one, which must lie inside the
image root all the same (see `mcad.data.corpus`: a path that leaves it is a bad row); the caption
column (`caption_key`, default `caption`, else open_clip's `title`) holds one caption. Several rows
with the same image become one image with several captions. The separator follows the extension
(`.tsv` -> tab, otherwise comma) unless given. Bad rows are reported as `file:line` and skipped.

One record is one physical line. A quote left open at the end of a line is that row's error
("unclosed quote"), and the lines after it are read as rows of their own: an unclosed quote can
no longer swallow the rest of the file into one caption. (Captions are one line; a quoted field
spanning lines is reported on each of its lines rather than joined.)
"""
from __future__ import annotations

import codecs
import csv
from pathlib import Path

from mcad.data.corpus import Corpus, DataError, LoadReport, clean_caption, under_root

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
    report = LoadReport(str(path))
    lines = physical_lines(read_text(path))
    return _read(lines, path, root, _separator(path, sep), report, split, img_key, caption_key, max_images, name)


def read_text(path: Path) -> str:
    """The file as text; not UTF-8 is one line with the byte offset in the file and its line."""
    data = path.read_bytes()
    skip = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = skip + e.start  # e.start counts from after the BOM
        line = data[:at].count(b"\n") + 1
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {at}, line {line})") from None


def physical_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line without its \\n or \\r\\n) of every line (str.splitlines would also
    split at form feeds and Unicode separators inside captions)."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [(n, ln[:-1] if ln.endswith("\r") else ln) for n, ln in enumerate(lines, 1)]


def parse_record(line: str, delimiter: str) -> list[str]:
    """One line as one record (strict: a quote left open or a stray one raises csv.Error)."""
    if "\x00" in line:
        raise csv.Error("NUL byte in line")
    try:
        return next(csv.reader([line], delimiter=delimiter, strict=True))
    except csv.Error as e:
        if "unexpected end of data" in str(e):
            raise csv.Error("unclosed quote") from None
        raise


def _read(lines: list[tuple[int, str]], path: Path, root: Path, delimiter: str, report: LoadReport, split: str,
          img_key: str | None, caption_key: str | None, max_images: int | None, name: str | None) -> Corpus:
    rows = [(n, ln) for n, ln in lines if ln.strip()]  # blank lines are not rows
    if not rows:
        raise DataError(f"{path}: empty file (expected a header row)")
    try:
        header = [h.strip() for h in parse_record(rows[0][1], delimiter)]
    except csv.Error as e:
        raise DataError(f"{path}:{rows[0][0]}: unreadable header ({e})") from None
    i_img = _pick_column(header, img_key, DEFAULT_IMG_KEYS, "image", path)
    i_cap = _pick_column(header, caption_key, DEFAULT_CAPTION_KEYS, "caption", path)

    by_image: dict[str, list[str]] = {}  # resolved image path -> captions, insertion-ordered
    exists: dict[str, bool] = {}
    for n, line in rows[1:]:
        where = f"{path}:{n}"
        try:
            row = parse_record(line, delimiter)
        except csv.Error as e:
            report.add(where, f"malformed row ({e})")
            continue
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
        p, inside = under_root(root, rel)
        if not inside:
            report.add(where, f"path leaves the image root ({root}): {rel}")
            continue
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
    if len(rows) == 1:
        raise DataError(f"{path}: header only, no data rows")
    paths, captions, c2i = [], [], []
    for idx, (img, caps) in enumerate(by_image.items()):
        paths.append(img)
        captions.extend(caps)
        c2i.extend([idx] * len(caps))
    return Corpus(name or path.stem, split, paths, captions, c2i, report)
