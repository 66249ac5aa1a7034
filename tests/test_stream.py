"""The one image loader (mcad.data.stream): files decoded on demand by DataLoader workers, the same
pixels as a whole-split decode, webdataset members read by offset, bad files found by the scan, and
a data key that follows the files' content."""
from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from mcad.data.stream import ArrayImages, FileImages, StepFeed, View, decode_view, open_images, scan


def _photo(seed: int, size) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (size[1] // 8 + 1, size[0] // 8 + 1, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.BILINEAR)  # smooth, JPEG-like content


@pytest.fixture
def photos(tmp_path):
    """A Karpathy JSON over 12 files of mixed sizes and formats, one of them corrupt."""
    root = tmp_path / "photos"
    (root / "images").mkdir(parents=True)
    entries = []
    for i in range(12):
        name = f"{i:02d}." + ("png" if i % 3 == 0 else "jpg")
        size = [(90, 60), (50, 80), (64, 64)][i % 3]
        if i == 7:
            (root / "images" / name).write_bytes(b"\xff\xd8 not really a jpeg")
        else:
            _photo(i, size).save(root / "images" / name, quality=90)
        entries.append({"filename": name, "split": "train", "sentences": [{"raw": f"photo {i}"}, {"raw": f"pic {i}"}]})
    (root / "data.json").write_text(json.dumps({"images": entries}))
    return root


def _spec(root):
    return {"format": "karpathy", "json": str(root / "data.json"), "image_root": str(root / "images")}


@pytest.mark.parametrize("view", [View(32), View(24, "shortest", 28), View(20, "squash")])
def test_files_stream_the_pixels_a_whole_decode_gives(photos, view):
    from mcad.data import spec
    from mcad.data.images import load_images

    images, corpus = spec.open_split(_spec(photos), "train", view, workers=2, progress=False)
    assert isinstance(images, FileImages) and not hasattr(images, "array")  # nothing decoded yet
    whole, ref = load_images(spec.load_corpus(_spec(photos), "train"), view.size, progress=False, view=view)
    assert corpus.image_paths == ref.image_paths and len(images) == 11  # the corrupt one is dropped
    assert corpus.captions == ref.captions and corpus.n_captions == 22
    assert any("07.jpg" in w and p.startswith("unreadable image") for w, p in corpus.report.problems)
    got = np.concatenate(list(images.chunks(4)))
    np.testing.assert_array_equal(got, whole)
    np.testing.assert_array_equal(images[[5, 0, 5]], whole[[5, 0, 5]])
    # training batches (pure functions of the step), decoded ahead by two workers, from any step on
    batch_of = _Batches(len(images))
    feed = StepFeed([images], batch_of, steps=6)
    assert feed.workers == 2
    for step in (0, 1, 2, 4, 5):  # 3 skipped: a resume starts the loader again there
        np.testing.assert_array_equal(feed(step)[0], whole[batch_of(step)])


class _Batches:
    def __init__(self, n):
        self.n = n

    def __call__(self, step):
        return np.random.default_rng(step).permutation(self.n)[:5]


def test_two_views_of_one_file_are_decoded_once_each_step(photos):
    from mcad.data import spec
    from mcad.data.stream import take_views

    a, corpus = spec.open_split(_spec(photos), "train", View(16), workers=0, progress=False)
    b = a.as_view(View(12, "squash"))
    assert b is not a and b.digests == a.digests and a.as_view(View(16)) is a
    got_a, got_b = take_views([a, b], np.array([3, 1]))
    for k, i in enumerate([3, 1]):
        np.testing.assert_array_equal(got_a[k], decode_view(corpus.image_paths[i], View(16)))
        np.testing.assert_array_equal(got_b[k], decode_view(corpus.image_paths[i], View(12, "squash")))


def test_data_key_follows_content_not_mtime(photos):
    from mcad.data import spec

    def key():
        images, corpus = spec.open_split(_spec(photos), "train", View(16), workers=0, progress=False)
        return images.key(corpus.captions)

    k0 = key()
    f = photos / "images" / "01.jpg"
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))  # touched: same bytes
    assert key() == k0
    _photo(99, (50, 80)).save(f, quality=90)  # new content at the same path
    assert key() != k0
    assert spec.open_split(_spec(photos), "train", View(16, "squash"), workers=0, progress=False)[0] \
        .key(["x"]) != spec.open_split(_spec(photos), "train", View(16), workers=0, progress=False)[0].key(["x"])


def test_scan_reads_each_file_once_until_it_changes(photos, monkeypatch):
    from mcad.data import scan as scan_module
    from mcad.data import spec

    corpus = spec.load_corpus(_spec(photos), "train")
    digests, bad = scan(corpus, progress=False)
    assert list(bad) == [7] and all(len(d) == 64 for d in digests)
    calls = []
    real = scan_module.check_one
    monkeypatch.setattr(scan_module, "check_one", lambda p, m: calls.append(p) or real(p, m))
    assert scan(spec.load_corpus(_spec(photos), "train"), progress=False) == (digests, bad)
    assert calls == []  # kept per file under MCAD_CACHE_DIR
    _photo(5, (90, 60)).save(photos / "images" / "03.png")
    d2, _ = scan(spec.load_corpus(_spec(photos), "train"), progress=False)
    assert [os.path.basename(p) for p in calls] == ["03.png"] and d2[3] != digests[3] and d2[:3] == digests[:3]


def test_webdataset_members_are_read_by_offset(tmp_path):
    import webdataset as wds

    from mcad.data import spec
    from mcad.data.wds import load_wds

    def jpeg(seed, size):
        buf = io.BytesIO()
        _photo(seed, size).save(buf, format="JPEG", quality=90)
        return buf.getvalue()

    with wds.TarWriter(str(tmp_path / "s-000.tar")) as w:
        w.write({"__key__": "a", "jpg": jpeg(1, (40, 30)), "txt": "first"})
        w.write({"__key__": "b", "jpg": b"\xff\xd8 broken", "txt": "broken"})
        w.write({"__key__": "c", "png": jpeg(2, (30, 40)), "txt": "  "})  # empty caption
    with wds.TarWriter(str(tmp_path / "s-001.tar")) as w:
        w.write({"__key__": "d", "jpg": jpeg(3, (50, 50)), "txt": "second"})
    shards = str(tmp_path / "s-{000..001}.tar")
    images, corpus = spec.open_split({"format": "wds", "shards": shards}, "train", View(16), workers=2, progress=False)
    ref_px, ref = load_wds(shards, 16)
    assert corpus.image_paths == ref.image_paths == ["a", "d"] and corpus.captions == ["first", "second"]
    np.testing.assert_array_equal(np.concatenate(list(images.chunks(1))), ref_px)
    problems = {w.rsplit("/", 1)[-1]: p for w, p in corpus.report.problems}
    assert problems["s-000.tar [c]"] == "empty caption" and problems["b"].startswith("unreadable image")


def test_an_array_is_served_as_it_is():
    arr = np.random.default_rng(0).integers(0, 256, (6, 3, 8, 8), dtype=np.uint8)
    images = ArrayImages(arr)
    assert images.as_view(View(32, "squash")) is images and images.workers == 0
    np.testing.assert_array_equal(images[np.array([4, 1])], arr[[4, 1]])
    np.testing.assert_array_equal(np.concatenate(list(images.chunks(4))), arr)
    from mcad.data.images import data_key

    assert images.key(["a"]) == data_key(arr, ["a"])  # the key records of the synthetic set hold


def test_open_images_of_nothing_readable_is_one_line(photos):
    from mcad.data.karpathy import load_karpathy

    for f in (photos / "images").iterdir():
        f.write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"data.json: no usable image-caption pairs in split 'train'"):
        open_images(load_karpathy(photos / "data.json", photos / "images", split="train"), View(8), progress=False)
