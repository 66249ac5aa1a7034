"""Unpaired data: images without captions and texts without images (mcad.data.unpaired,
distill.unpaired). The teachers' tables against a brute-force reference, the cache through
`mcad cache`, the student on unpaired-only and mixed data (losses pinned), and bad input."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from test_distill_recipe import logged_losses  # noqa: E402  (tests/ is on sys.path)

K = 3
# The losses a two-step run logs (online teachers, one thread, the session's tiny teachers and
# benchmark): unpaired-only (40 photos + 60 queries, MCAD) and mixed (the train split's pairs +
# the 60 queries, whose candidate images are the train split's). Recorded from this code; a
# change in the unpaired batches, tables or loss moves them.
PINNED = {
    "unpaired-only": {1: {"loss": 3.50679, "u_dist": 0.00112443, "u_feat": 3.4843},
                      2: {"loss": 2.17517, "u_dist": 0.00154851, "u_feat": 2.1442}},
    # the paired terms differ from test_distill_recipe's MCAD pins: one forward encodes the paired and
    # the unpaired images together, and the student's batch norm sees both
    # step 1 only: step 2 moved by 0.03-0.6% when the whole suite ran before it (the session's 2-step
    # teachers put candidates within float rounding of each other, and Adam's first step turns rounding
    # in near-zero gradients into whole steps); the total = the terms check holds at every step
    "mixed": {1: {"loss": 8.22891, "clip": 3.02286, "dist": 0.001224, "feat": 3.45182, "u_dist": 0.00158778,
                  "u_feat": 3.42774}},
}


@pytest.fixture(scope="module")
def unpaired_files(synth_root, tmp_path_factory):
    """A folder of 40 photos (the test split's images, some in a subfolder, beside a file that is not
    an image) and a text file of 60 queries (the val split's captions, with a blank line)."""
    from mcad.data.karpathy import load_karpathy

    root = tmp_path_factory.mktemp("unpaired")
    photos = root / "photos"
    (photos / "trip").mkdir(parents=True)
    test = load_karpathy(synth_root / "dataset_synth.json", split="test")
    for n, src in enumerate(test.image_paths[:40]):
        shutil.copy(src, (photos / "trip" if n % 3 == 0 else photos) / f"p{n:03d}.png")
    (photos / "notes.txt").write_text("not an image")
    texts = load_karpathy(synth_root / "dataset_synth.json", split="val").captions[:60]
    queries = root / "queries.txt"
    queries.write_text("\n".join(texts[:30]) + "\n\n" + "\n".join(texts[30:]) + "\n", encoding="utf-8")
    return photos, queries, texts


def _teachers(teachers):
    from mcad.models.checkpoint import load_model
    from mcad.tokenizer import Tokenizer

    return (load_model(teachers / "dual.safetensors"), load_model(teachers / "fusion.safetensors"),
            Tokenizer.load(teachers / "tokenizer.json"))


def _check_top_k(got: np.ndarray, sims: np.ndarray, k: int) -> None:
    """`got` is each row's top-k of `sims` (float64 reference): its scores are the k largest, and where
    the reference has no near-tie (1e-5) among them the indices are numpy's (a stable argsort)."""
    ref = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    srt = np.take_along_axis(sims, ref, 1)
    np.testing.assert_allclose(np.take_along_axis(sims, got, 1), srt, atol=1e-5)
    nxt = -np.sort(-sims, axis=1)[:, k] if sims.shape[1] > k else np.full(len(sims), -np.inf)
    clear = (np.diff(-srt, axis=1) > 1e-5).all(1) & (srt[:, -1] - nxt > 1e-5)
    assert clear.mean() > 0.8, clear.mean()  # the exact check below covers most rows
    np.testing.assert_array_equal(got[clear], ref[clear])


def test_unpaired_tables_equal_a_brute_force_reference(teachers, unpaired_files):
    from mcad.data.images import decode_image, normalize
    from mcad.data.stream import View
    from mcad.data.unpaired import Source, load_unpaired_texts, open_unpaired_images
    from mcad.distill.unpaired import compute_tables

    dual, fusion, tok = _teachers(teachers)
    photos, queries, texts = unpaired_files
    images = open_unpaired_images(Source("images", "folder", str(photos)), View(64), 0, progress=False)
    assert load_unpaired_texts(Source("texts", "text file", str(queries))) == texts
    ids = tok.encode_batch(texts)
    # small image chunks and pair batches: the chunked computation is what is checked
    tb = compute_tables(dual, fusion, images, ids, None, K, tau_f=0.7, fused=True, chunk_images=16, pair_batch=32)

    files = sorted(str(p) for p in photos.rglob("*.png"))
    assert len(files) == len(tb.v) == 40
    px = normalize(np.stack([decode_image(f, 64) for f in files]), dual.image_mean, dual.image_std)
    with torch.no_grad():
        v, t = dual.encode_image(px), dual.encode_text(torch.as_tensor(ids))
    torch.testing.assert_close(tb.v, v, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tb.t, t, atol=1e-5, rtol=1e-5)
    sims = v.double().numpy() @ t.double().numpy().T
    _check_top_k(tb.i2t, sims, K)
    _check_top_k(tb.t2i, sims.T, K)

    with torch.no_grad():  # F on each candidate pair alone
        img_tok, txt_tok = fusion.image_tokens(px), fusion.text_tokens(torch.as_tensor(ids))

        def f(a, b):
            h, m = fusion.fuse(img_tok[a:a + 1], txt_tok[b:b + 1], torch.as_tensor(ids[b:b + 1]))
            return h[0], m[0]

        for table, m_tab, h_tab, pair in ((tb.i2t, tb.m_i2t, tb.h_img, lambda r, c: (r, c)),
                                          (tb.t2i, tb.m_t2i, tb.h_txt, lambda r, c: (c, r))):
            for r in range(len(table)):
                hm = [f(*pair(r, int(c))) for c in table[r]]
                m_ref = torch.stack([m for _, m in hm])
                torch.testing.assert_close(m_tab[r], m_ref, atol=2e-4, rtol=1e-4)
                h_ref = (torch.softmax(m_ref / 0.7, 0)[:, None] * torch.stack([h for h, _ in hm])).sum(0)
                torch.testing.assert_close(h_tab[r], h_ref, atol=2e-4, rtol=1e-4)
    assert tb.m_i2t.std() > 0  # F's logits differ between candidates: the checks above compared something
    d_only = compute_tables(dual, fusion, images, ids, None, K, with_f=False)  # dual KD never reads F
    assert np.array_equal(d_only.i2t, tb.i2t) and not d_only.m_i2t.any() and d_only.h_img is None


def test_unpaired_batches_hold_each_anchors_candidates():
    from mcad.distill.unpaired import UnpairedBatches, UnpairedTables, batch_outputs

    rng = np.random.default_rng(0)
    i2t = np.stack([rng.choice(50, 3, replace=False) for _ in range(30)])
    t2i = np.stack([rng.choice(30, 3, replace=False) for _ in range(50)])
    batches = UnpairedBatches(i2t, t2i, 16, seed=1)
    for step in range(5):
        img, txt = batches(step)
        assert len(img) == len(set(img)) == 16 and len(txt) == len(set(txt)) == 16
        a = batches.anchors
        assert set(i2t[img[:a]].ravel()) <= set(txt) and set(t2i[txt[:a]].ravel()) <= set(img)
        again = batches(step)
        assert np.array_equal(again[0], img) and np.array_equal(again[1], txt)  # a pure function of the step
    tables = UnpairedTables(torch.zeros(30, 4), torch.zeros(50, 4), i2t, t2i, torch.arange(90.).view(30, 3),
                            -torch.arange(150.).view(50, 3))
    out = batch_outputs(tables, img, txt)
    for x in range(len(img)):
        for y in range(len(txt)):
            hit = np.nonzero(i2t[img[x]] == txt[y])[0]
            assert bool(out.mask_i2t[x, y]) == (len(hit) == 1)
            assert out.m_i2t[x, y] == (tables.m_i2t[img[x], hit[0]] if len(hit) else 0)
            hit = np.nonzero(t2i[txt[y]] == img[x])[0]
            assert bool(out.mask_t2i[y, x]) == (len(hit) == 1)
            assert out.m_t2i[y, x] == (tables.m_t2i[txt[y], hit[0]] if len(hit) else 0)


def test_unpaired_cache_files_round_trip_and_refuse_what_they_cannot_serve(tmp_path):
    from mcad.distill.unpaired import UnpairedTables, read_tables, write_tables

    rng = np.random.default_rng(0)
    tables = UnpairedTables(torch.randn(6, 4), torch.randn(5, 4), rng.integers(0, 5, (6, 2)), rng.integers(0, 6, (5, 2)),
                            torch.randn(6, 2), torch.randn(5, 2))
    write_tables(tmp_path, tables, "key-a", {"images": "x"}, tau_f=1.0)
    assert read_tables(tmp_path / "none", "key-a", False, 1.0, "hint") is None  # no cache: computed by the run
    back = read_tables(tmp_path, "key-a", False, 1.0, "hint")
    for name in ("v", "t", "m_i2t", "m_t2i"):
        assert torch.equal(getattr(back, name), getattr(tables, name)), name
    assert np.array_equal(back.i2t, tables.i2t) and np.array_equal(back.t2i, tables.t2i) and back.h_img is None
    with pytest.raises(ValueError, match=r"of other teachers, images, texts or unpaired.k than this run's: hint"):
        read_tables(tmp_path, "key-b", False, 1.0, "hint")
    with pytest.raises(ValueError, match=r"without fused features at loss.tau_f=1 .*this run has loss.lam > 0: hint"):
        read_tables(tmp_path, "key-a", True, 1.0, "hint")
    raw = bytearray((tmp_path / "tables.safetensors").read_bytes())
    raw[-3] ^= 0xFF
    (tmp_path / "tables.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"tables.safetensors: content differs from the sha256 .* \(damaged\)"):
        read_tables(tmp_path, "key-a", False, 1.0, "hint")


def _student(teachers, synth_root, tmp_path, name, *extra):
    from mcad.distill.recipe import main

    assert main([f"data={synth_root}", f"teachers={teachers}", f"out={tmp_path}", f"name={name}", "variant=mcad",
                 "steps=2", "batch_size=16", "threads=1", "warmup=1", f"unpaired.k={K}", *extra]) == 0
    return tmp_path / name


def _assert_pinned(key, run):
    got = logged_losses(run)
    assert sorted(got) == [1, 2], got
    for step, want in PINNED[key].items():
        assert got[step] == pytest.approx(want, rel=1e-4, abs=1e-9), f"{key}: logged {got}"


def test_student_on_unpaired_data_only(teachers, synth_root, unpaired_files, tmp_path):
    photos, queries, _ = unpaired_files
    run = _student(teachers, synth_root, tmp_path, "u-only", f"cache={tmp_path / 'nocache'}",
                   f"unpaired.images={photos}", f"unpaired.texts={queries}", "unpaired.paired=false")
    m = json.loads((run / "metrics.json").read_text())
    assert m["teacher_outputs"] == "unpaired only" and m["unpaired"]["n_images"] == 40
    assert m["unpaired"]["n_texts"] == 60 and m["unpaired"]["teacher_outputs"] == "computed"
    assert set(logged_losses(run)[1]) == {"loss", "u_dist", "u_feat"}  # no label: no contrastive term
    _assert_pinned("unpaired-only", run)


def test_student_on_paired_and_unpaired_data(teachers, synth_root, unpaired_files, tmp_path):
    _, queries, _ = unpaired_files
    run = _student(teachers, synth_root, tmp_path, "mixed", f"cache={tmp_path / 'nocache'}",
                   f"unpaired.texts={queries}", "unpaired.weight=0.5")
    m = json.loads((run / "metrics.json").read_text())
    assert m["unpaired"]["images"] == "the train split's images" and m["unpaired"]["n_images"] == 240
    for step, got in logged_losses(run).items():  # the total is the paired loss + weight · the unpaired one
        total = got["clip"] + 20 * got["dist"] + got["feat"] + 0.5 * (20 * got["u_dist"] + got["u_feat"])
        assert got["loss"] == pytest.approx(total, rel=1e-4), step
    _assert_pinned("mixed", run)


def test_unpaired_targets_take_the_fused_features_when_on(teachers, synth_root, unpaired_files, tmp_path):
    """λ > 0: the unpaired targets fold in F's fused features over each image's and text's candidates
    (the tables hold them), through the adapters fitted on the pairs; the λ = 0 run's term moves."""
    _, queries, _ = unpaired_files
    fused = _student(teachers, synth_root, tmp_path, "mixed-lam", f"cache={tmp_path / 'nocache'}",
                     f"unpaired.texts={queries}", "unpaired.weight=0.5", "loss.lam=0.5", "adapters.steps=2",
                     "adapters.batch_size=8")
    assert "fusion adapters" in (fused / "train.log").read_text()
    assert logged_losses(fused)[1]["u_dist"] != PINNED["mixed"][1]["u_dist"]


def test_unpaired_cache_through_mcad_cache(teachers, synth_root, unpaired_files, tmp_path):
    """`mcad cache` writes the unpaired tables (and no paired cache with unpaired.paired=false); a run
    reads them and logs what a run computing them logs; other k is refused in one line."""
    from mcad.distill.cache import main as cache_main
    from mcad.distill.recipe import main

    photos, queries, _ = unpaired_files
    args = [f"unpaired.images={photos}", f"unpaired.texts={queries}", "unpaired.paired=false"]
    cache = tmp_path / "cache"
    assert cache_main([f"data={synth_root}", f"teachers={teachers}", f"cache={cache}", "threads=1",
                       f"unpaired.k={K}", *args]) == 0
    assert (cache / "unpaired" / "manifest.json").exists() and not (cache / "manifest.json").exists()
    cached = _student(teachers, synth_root, tmp_path, "cached", f"cache={cache}", *args)
    online = _student(teachers, synth_root, tmp_path, "online", f"cache={tmp_path / 'nocache'}", *args)
    assert "unpaired: teachers from the cache" in (cached / "train.log").read_text()
    a, b = logged_losses(cached), logged_losses(online)
    for step in (1, 2):
        assert a[step] == pytest.approx(b[step], rel=1e-4, abs=1e-7)
    with pytest.raises(ValueError, match="other teachers, images, texts or unpaired.k") as e:
        main([f"data={synth_root}", f"teachers={teachers}", f"out={tmp_path}", f"cache={cache}", "steps=1",
              "threads=1", "unpaired.k=2", *args])
    assert "\n" not in str(e.value)


def test_a_data_specs_images_and_captions_serve_as_unpaired_sources(synth_root):
    from mcad.data.karpathy import load_karpathy
    from mcad.data.stream import View
    from mcad.data.unpaired import load_unpaired_texts, open_unpaired_images, parse_unpaired

    un = parse_unpaired({"images": str(synth_root), "paired": False,
                         "texts": {"format": "karpathy", "json": str(synth_root / "dataset_synth.json"), "split": "val"}})
    assert un.images.form == un.texts.form == "spec" and (un.images.split, un.texts.split) == ("train", "val")
    assert load_unpaired_texts(un.texts) == load_karpathy(synth_root / "dataset_synth.json", split="val").captions
    assert len(open_unpaired_images(un.images, View(64), 0, False)) == 240
    assert "split=val (texts)" in un.texts.describe()


# -- bad input: one line each ------------------------------------------------------------------------
def test_bad_unpaired_input_is_one_line(tmp_path, unpaired_files):
    from mcad.data.stream import View
    from mcad.data.unpaired import Source, load_unpaired_texts, open_unpaired_images, parse_unpaired

    photos, queries, _ = unpaired_files
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "list.txt").write_text("a photo")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a png")
    blank, latin = tmp_path / "blank.txt", tmp_path / "latin.txt"
    blank.write_text("\n  \n\n")
    latin.write_bytes("a red circle\na blue square\nun caf\xe9 noir\n".encode("latin-1"))

    def one_line(fn, pattern):
        with pytest.raises(ValueError, match=pattern) as e:
            fn()
        assert "\n" not in str(e.value), str(e.value)

    one_line(lambda: open_unpaired_images(Source("images", "folder", str(empty)), View(64), 0, False),
             rf"unpaired.images={empty}: no image files .* under {empty}")
    one_line(lambda: open_unpaired_images(Source("images", "folder", str(broken)), View(64), 0, False),
             rf"unpaired.images={broken}: no readable image \(1 files skipped, the first: .*a.png: unreadable")
    one_line(lambda: load_unpaired_texts(Source("texts", "text file", str(blank))), rf"{blank}: no text in the file")
    one_line(lambda: load_unpaired_texts(Source("texts", "text file", str(latin))),
             rf"unpaired.texts={latin}: line 3 is not UTF-8 \(.* byte 7 of the line, 0xe9\)")
    one_line(lambda: parse_unpaired({"images": str(photos), "paired": False}),
             r"unpaired.paired=false needs both unpaired.images and unpaired.texts \(unpaired.texts is not given")
    one_line(lambda: parse_unpaired({"images": str(tmp_path / "nowhere")}), r"unpaired.images=.*nowhere: no such folder")
    one_line(lambda: parse_unpaired({"texts": str(photos)}), r"unpaired.texts=.*photos: a folder, not a text file")
    one_line(lambda: parse_unpaired({"k": 0}), r"unpaired.k=0: must be a positive integer")
    one_line(lambda: parse_unpaired({"weight": -1}), r"unpaired.weight=-1: must be a number >= 0")
    one_line(lambda: parse_unpaired({"imgs": "x"}), r"unpaired.imgs: unknown key")


def test_recipe_refuses_unpaired_settings_it_cannot_run(teachers, synth_root, unpaired_files, tmp_path):
    from mcad.distill.recipe import main

    photos, queries, _ = unpaired_files
    common = [f"data={synth_root}", f"teachers={teachers}", f"out={tmp_path}", "steps=1", "threads=1",
              f"unpaired.images={photos}", f"unpaired.texts={queries}", "unpaired.paired=false"]
    with pytest.raises(ValueError, match=r"variant=none learns from labels only .* unpaired.paired=true"):
        main([*common, "variant=none"])
    with pytest.raises(ValueError, match=r"loss.lam=0.5 with unpaired.paired=false: the fusion adapters"):
        main([*common, "loss.lam=0.5"])
    with pytest.raises(ValueError, match=rf"unpaired.images={tmp_path}: no image files"):
        main([*common[:5], f"unpaired.images={tmp_path}"])
