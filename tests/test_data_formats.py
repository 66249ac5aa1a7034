"""Loaders on fixtures written at test time in the real formats (Karpathy JSON, CSV/TSV, webdataset
tars), with the kinds of bad rows real data has: missing images, corrupt image files, empty captions,
wrong column counts."""
from __future__ import annotations

import io
from pathlib import Path
import json

import numpy as np
import pytest
from PIL import Image

from mcad.data import load_corpus, load_pixels
from mcad.data.corpus import DataError
from mcad.data.csv_data import load_csv
from mcad.data.images import load_images
from mcad.data.karpathy import load_karpathy

COLOURS = {"a": (200, 30, 30), "b": (30, 200, 30), "c": (30, 30, 200), "e": (200, 200, 30),
           "f": (200, 30, 200), "g": (30, 200, 200), "h": (120, 120, 120)}


def image_bytes(colour, fmt="JPEG", size=(40, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


def write_image(path, colour, fmt="JPEG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(colour, fmt))
    return path


def write_corrupt(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    return path


def assert_colour(pixels, colour, tol=12):
    mean = pixels.reshape(3, -1).mean(axis=1)
    assert np.abs(mean - np.array(colour)).max() < tol, (mean, colour)


def problems_text(report) -> str:
    return "\n".join(f"{w}: {p}" for w, p in report.problems)


# --------------------------------------------------------------------------------------------
# Karpathy JSON


def sent(raw, sentid):
    return {"tokens": raw.lower().split(), "raw": raw, "imgid": 0, "sentid": sentid}


@pytest.fixture
def karpathy(tmp_path):
    root = tmp_path / "flickr"
    imgs = root / "images"
    write_image(imgs / "a.jpg", COLOURS["a"])
    write_image(imgs / "sub" / "b.jpg", COLOURS["b"])
    write_image(imgs / "c.jpg", COLOURS["c"])
    write_corrupt(imgs / "e.jpg")
    write_image(imgs / "f.jpg", COLOURS["f"])
    write_image(imgs / "g.jpg", COLOURS["g"])
    entries = [
        ("a.jpg", "", "train", ["a dog runs", "A  dog\nrunning fast"]),
        ("b.jpg", "sub", "restval", ["a cat sleeps"]),
        ("c.jpg", "", "test", ["a red car", "a car parked", "the car"]),
        ("d.jpg", "", "test", ["missing image caption"]),
        ("e.jpg", "", "test", ["corrupt image caption 1", "corrupt image caption 2"]),
        ("f.jpg", "", "test", ["", "a man on a bike"]),
        ("g.jpg", "", "val", ["   ", ""]),
    ]
    images, sid = [], 0
    for k, (fn, fp, split, caps) in enumerate(entries):
        images.append({"filepath": fp, "filename": fn, "imgid": k, "split": split,
                       "sentids": list(range(sid, sid + len(caps))),
                       "sentences": [sent(c, sid + j) for j, c in enumerate(caps)]})
        sid += len(caps)
    path = root / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    return path


def test_karpathy_train_includes_restval(karpathy):
    c = load_karpathy(karpathy, split="train")
    assert [p.split("/")[-1] for p in c.image_paths] == ["a.jpg", "b.jpg"]
    assert c.image_paths[1].endswith("sub/b.jpg")
    assert c.captions == ["a dog runs", "A dog running fast", "a cat sleeps"]
    assert c.caption_to_image.tolist() == [0, 0, 1]
    assert c.name == "flickr30k" and not c.report.problems


def test_karpathy_bad_rows_reported(karpathy):
    c = load_karpathy(karpathy, split="test")
    names = [p.split("/")[-1] for p in c.image_paths]
    assert names == ["c.jpg", "e.jpg", "f.jpg"]  # e is corrupt, found only when decoding
    assert c.caption_to_image.tolist() == [0, 0, 0, 1, 1, 2]
    assert c.captions[-1] == "a man on a bike"
    text = problems_text(c.report)
    assert "d.jpg" in text and "missing image" in text
    assert "f.jpg" in text and "empty caption" in text
    assert len(c.report.problems) == 2
    assert c.report.summary()["by_problem"] == {"missing image": 1, "empty caption": 1}


def test_load_images_drops_corrupt_and_reindexes(karpathy):
    c = load_karpathy(karpathy, split="test")
    pixels, c2 = load_images(c, 16, progress=False)
    assert pixels.shape == (2, 3, 16, 16) and pixels.dtype == np.uint8
    assert [p.split("/")[-1] for p in c2.image_paths] == ["c.jpg", "f.jpg"]
    assert c2.captions == ["a red car", "a car parked", "the car", "a man on a bike"]
    assert c2.caption_to_image.tolist() == [0, 0, 0, 1]
    assert_colour(pixels[0], COLOURS["c"])
    assert_colour(pixels[1], COLOURS["f"])
    bad = [(w, p) for w, p in c2.report.problems if "unreadable image" in p]
    assert len(bad) == 1 and bad[0][0].endswith("e.jpg")


def test_load_images_reports_decompression_bombs(karpathy, monkeypatch):
    """An image whose header claims more than twice PIL's pixel limit raises
    DecompressionBombError (not an OSError): reported and dropped like any unreadable image."""
    from PIL import Image

    c = load_karpathy(karpathy, split="test")
    big = Path(c.image_paths[0])  # c.jpg
    big.write_bytes(image_bytes(COLOURS["c"], size=(400, 320)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # bomb above 20,000 pixels: 400 x 320 only
    pixels, c2 = load_images(c, 16, progress=False)
    assert [p.split("/")[-1] for p in c2.image_paths] == ["f.jpg"] and len(pixels) == 1
    bad = {w.split("/")[-1]: p for w, p in c2.report.problems if "unreadable image" in p}
    assert set(bad) == {"c.jpg", "e.jpg"} and "DecompressionBombError" in bad["c.jpg"]


def test_karpathy_nothing_usable_names_file(karpathy):
    with pytest.raises(DataError, match="dataset_flickr30k.json"):
        load_karpathy(karpathy, split="val")  # g.jpg: only empty captions


def test_karpathy_bad_files(tmp_path):
    with pytest.raises(DataError, match="nope.json"):
        load_karpathy(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="bad.json"):
        load_karpathy(bad)


# --------------------------------------------------------------------------------------------
# CSV / TSV


@pytest.fixture
def csv_dir(tmp_path):
    d = tmp_path / "csvdata"
    for n in "abc":
        write_image(d / "img" / f"{n}.jpg", COLOURS[n])
    write_corrupt(d / "img" / "e.jpg")
    return d


def test_csv_groups_captions_and_reports(csv_dir):
    rows = [
        "filepath,caption",
        "img/a.jpg,a red square",                # 2
        "img/b.jpg,\"green, bright\"",           # 3 (quoted comma)
        "img/a.jpg,another red one",             # 4 same image -> second caption
        "img/missing.jpg,nothing here",          # 5 missing
        "img/c.jpg,",                            # 6 empty caption
        "img/c.jpg,blue,extra",                  # 7 wrong column count
        "",                                      # 8 blank line: ignored
        "img/c.jpg,a blue one",                  # 9
        "img/e.jpg,corrupt image",               # 10
    ]
    path = csv_dir / "pairs.csv"
    path.write_text("\n".join(rows) + "\n")
    c = load_csv(path)
    names = [p.split("/")[-1] for p in c.image_paths]
    assert names == ["a.jpg", "b.jpg", "c.jpg", "e.jpg"]
    assert c.captions == ["a red square", "another red one", "green, bright", "a blue one", "corrupt image"]
    assert c.caption_to_image.tolist() == [0, 0, 1, 2, 3]
    got = {w.split("/")[-1]: p for w, p in c.report.problems}
    assert set(got) == {"pairs.csv:5", "pairs.csv:6", "pairs.csv:7"}
    assert got["pairs.csv:5"].startswith("missing image")
    assert got["pairs.csv:6"] == "empty caption"
    assert got["pairs.csv:7"].startswith("wrong column count")
    pixels, c2 = load_images(c, 8, progress=False)
    assert c2.n_images == 3 and c2.caption_to_image.tolist() == [0, 0, 1, 2]
    assert any(w.endswith("e.jpg") and "unreadable image" in p for w, p in c2.report.problems)
    for i, n in enumerate("abc"):
        assert_colour(pixels[i], COLOURS[n])


def test_tsv_custom_keys_and_image_root(tmp_path, csv_dir):
    path = tmp_path / "meta" / "pairs.tsv"
    path.parent.mkdir()
    path.write_text("id\ttext\timage\n1\ta, b and c\tb.jpg\n2\tred\ta.jpg\n3\tgone\tzz.jpg\n4\tshort\n")
    c = load_csv(path, image_root=csv_dir / "img", img_key="image", caption_key="text", split="val")
    assert [p.split("/")[-1] for p in c.image_paths] == ["b.jpg", "a.jpg"]
    assert c.captions == ["a, b and c", "red"] and c.split == "val"
    where = sorted(w.split("/")[-1] for w, _ in c.report.problems)
    assert where == ["pairs.tsv:4", "pairs.tsv:5"]


def test_csv_open_clip_title_column_and_absolute_paths(tmp_path, csv_dir):
    path = tmp_path / "oc.csv"
    path.write_text(f"filepath,title\n{csv_dir / 'img' / 'a.jpg'},a photo\n")
    c = load_csv(path)
    assert c.image_paths == [str(csv_dir / "img" / "a.jpg")] and c.captions == ["a photo"]


def test_csv_errors_name_the_file(tmp_path, csv_dir):
    with pytest.raises(DataError, match="nothing.csv"):
        load_csv(tmp_path / "nothing.csv")
    nohead = csv_dir / "nohead.csv"
    nohead.write_text("path,caption\nimg/a.jpg,x\n")
    with pytest.raises(DataError, match=r"nohead.csv: no image column 'filepath'"):
        load_csv(nohead)
    allbad = csv_dir / "allbad.csv"
    allbad.write_text("filepath,caption\nimg/missing.jpg,x\nimg/a.jpg,\n")
    with pytest.raises(DataError, match="allbad.csv") as e:
        load_csv(allbad)
    assert "2 rows skipped" in str(e.value)
    empty = csv_dir / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.csv"):
        load_csv(empty)


# --------------------------------------------------------------------------------------------
# webdataset


@pytest.fixture
def shards(tmp_path):
    import webdataset as wds

    d = tmp_path / "wds"
    d.mkdir()
    with wds.TarWriter(str(d / "shard-000000.tar")) as w:
        w.write({"__key__": "s000", "jpg": image_bytes(COLOURS["a"]), "txt": "a red thing"})
        w.write({"__key__": "s001", "jpg": np.random.default_rng(1).integers(0, 256, 300, dtype=np.uint8).tobytes(),
                 "txt": "corrupt"})
        w.write({"__key__": "s002", "jpg": image_bytes(COLOURS["b"]), "txt": "  \n"})
    with wds.TarWriter(str(d / "shard-000001.tar")) as w:
        w.write({"__key__": "s003", "png": image_bytes(COLOURS["c"], "PNG"), "txt": "a blue\nthing"})
        w.write({"__key__": "s004", "jpg": image_bytes(COLOURS["e"])})  # no caption
        w.write({"__key__": "s005", "jpg": image_bytes(COLOURS["f"], size=(30, 50)), "txt": "purple"})
    return d


def test_wds_load(shards):
    from mcad.data.wds import load_wds

    pixels, c = load_wds(str(shards / "shard-{000000..000001}.tar"), 16)
    assert pixels.shape == (3, 3, 16, 16) and pixels.dtype == np.uint8
    assert c.image_paths == ["s000", "s003", "s005"]
    assert c.captions == ["a red thing", "a blue thing", "purple"]
    assert c.caption_to_image.tolist() == [0, 1, 2]
    for i, n in enumerate("acf"):
        assert_colour(pixels[i], COLOURS[n])
    probs = {w.split("/")[-1]: p for w, p in c.report.problems}
    assert set(probs) == {"shard-000000.tar [s001]", "shard-000000.tar [s002]", "shard-000001.tar [s004]"}
    assert probs["shard-000000.tar [s001]"].startswith("unreadable image")
    assert probs["shard-000000.tar [s002]"] == "empty caption"
    assert probs["shard-000001.tar [s004]"].startswith("no caption")
    assert c.report.summary()["skipped"] == 3


def test_wds_stream_and_list(shards):
    from mcad.data.corpus import LoadReport
    from mcad.data.wds import iter_wds

    report = LoadReport("test")
    lst = [shards / "shard-000001.tar", shards / "shard-000000.tar", shards / "shard-000009.tar"]
    got = list(iter_wds(lst, 8, report))
    assert [cap for _, cap in got] == ["a blue thing", "purple", "a red thing"]
    assert all(im.shape == (3, 8, 8) and im.dtype == np.uint8 for im, _ in got)
    where = [w.split("/")[-1] for w, _ in report.problems]
    assert "shard-000009.tar" in where and len(report.problems) == 4


def test_wds_truncated_shard_reported(shards):
    from mcad.data.wds import load_wds

    data = (shards / "shard-000001.tar").read_bytes()
    (shards / "cut.tar").write_bytes(data[: len(data) // 2 + 100])
    pixels, c = load_wds([shards / "shard-000000.tar", shards / "cut.tar"], 8)
    assert "s000" in c.image_paths and len(pixels) == c.n_images
    assert any("cut.tar" in w for w, _ in c.report.problems)


def test_wds_nothing_usable_names_shard(tmp_path):
    import webdataset as wds

    from mcad.data.wds import load_wds

    path = tmp_path / "bad-000.tar"
    with wds.TarWriter(str(path)) as w:
        w.write({"__key__": "x", "jpg": b"not an image", "txt": "caption"})
    with pytest.raises(DataError, match="bad-000.tar"):
        load_wds(str(path), 8)


# --------------------------------------------------------------------------------------------
# dispatcher and `mcad data check`


def test_load_corpus_dispatch(karpathy, csv_dir, shards, tmp_path):
    (csv_dir / "p.csv").write_text("filepath,caption\nimg/a.jpg,x\nimg/b.jpg,y\n")
    c = load_corpus({"format": "csv", "path": str(csv_dir / "p.csv")}, "test")
    assert c.captions == ["x", "y"] and c.split == "test"
    c = load_corpus({"format": "karpathy", "json": str(karpathy),
                     "image_root": str(karpathy.parent / "images")}, "train")
    assert c.n_images == 2
    c = load_corpus({"format": "csv", "path": {"train": str(csv_dir / "p.csv")}}, "train")
    assert c.n_images == 2
    with pytest.raises(ValueError, match="no entry for split 'test'"):
        load_corpus({"format": "csv", "path": {"train": str(csv_dir / "p.csv")}}, "test")
    pixels, c = load_pixels({"format": "wds", "shards": str(shards / "shard-{000000..000001}.tar"),
                             "image_size": 8}, "train")
    assert pixels.shape == (3, 3, 8, 8) and c.n_images == 3
    assert load_corpus({"format": "wds", "shards": [str(shards / "shard-000001.tar")]}).n_images == 2
    from mcad.data.synthetic import generate

    generate(tmp_path / "synth", seed=0, n_train=8, n_val=4, n_test=4, progress=False)
    c = load_corpus({"format": "synthetic", "root": str(tmp_path / "synth")}, "test")
    assert c.n_images == 4 and c.n_captions == 20 and c.meta[0]["scene"]
    pixels, c = load_pixels({"format": "synthetic", "root": str(tmp_path / "synth")}, "val", size=32)
    assert pixels.shape == (4, 3, 32, 32)
    with pytest.raises(ValueError, match="karpathy, csv, wds, synth"):
        load_corpus({"format": "parquet"}, "test")
    with pytest.raises(ValueError, match="needs data.csv"):
        load_corpus({"format": "csv"}, "test")
    with pytest.raises(ValueError, match="unknown key"):
        load_corpus({"format": "csv", "path": "x.csv", "img_col": "a"}, "test")


def test_cli_check(csv_dir, shards, capsys):
    from mcad.data.cli import main

    (csv_dir / "p.csv").write_text("filepath,caption\nimg/a.jpg,x\nimg/a.jpg,y\nimg/e.jpg,z\nimg/q.jpg,w\n")
    assert main(["check", "format=csv", f"path={csv_dir / 'p.csv'}", "decode=true", "size=8"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["images"] == 1 and out["captions"] == 2 and out["decoded"] is True
    assert out["report"]["skipped"] == 2
    assert out["report"]["by_problem"] == {"missing image": 1, "unreadable image": 1}
    assert main(["check", "format=wds", f"shards={shards / 'shard-000000.tar'}", "split=train"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["images"] == 1 and out["report"]["skipped"] == 2
