"""Issue 13, "nothing stale, nothing silent, nothing of the user's lost": one test per class of
fault. Each failed on the code before the fix (stale caches reused, corrupt files accepted,
mismatches and bad numbers taken, inputs misread without a count, 0600 files, temp files left)."""
from __future__ import annotations

import json
import os
import random
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mcad.data.corpus import DataError


def error_lines(capsys) -> list[str]:
    """What the CLI printed on stderr besides progress bars; a traceback would show here too."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [ln for ln in err.splitlines() if ln.startswith("mcad ")]


def tiny_synth(root: Path, seed: int) -> Path:
    """A few-image synthetic set written through the CLI path (`mcad data ... force=true`)."""
    from mcad.data.cli import make_synthetic

    make_synthetic({"out": str(root), "seed": seed, "n_train": 8, "n_val": 4, "n_test": 8,
                    "force": True, "progress": False})
    return root


# -- 1. stale caches ----------------------------------------------------------------------------
def test_pixel_cache_is_keyed_by_image_content(tmp_path):
    """`mcad data seed=2 force=true` over an existing set writes new images at the same paths:
    the pixel cache beside the data must not hand back the old ones."""
    from mcad.data.images import load_images
    from mcad.data.karpathy import load_karpathy
    from mcad.distill.teachers import load_split

    root = tiny_synth(tmp_path / "d", seed=0)
    old, _ = load_split(root, "train", 64)                 # writes pixels_train_64_*.npz
    assert len(list(root.glob("pixels_train_64_*.npz"))) == 1
    tiny_synth(root, seed=2)
    new, corpus = load_split(root, "train", 64)
    fresh, _ = load_images(load_karpathy(root / "dataset_synth.json", split="train"), 64, progress=False)
    assert not np.array_equal(old, fresh)
    np.testing.assert_array_equal(new, fresh)
    assert len(list(root.glob("pixels_train_64_*.npz"))) == 1  # rewritten in place, not piled up
    again, _ = load_split(root, "train", 64)               # and a valid cache is still used
    np.testing.assert_array_equal(again, fresh)


def test_pixel_cache_hit_drops_unreadable_rows_like_a_fresh_decode(tmp_path):
    from mcad.data.images import load_images
    from mcad.data.karpathy import load_karpathy

    root = tiny_synth(tmp_path / "d", seed=0)
    corpus = load_karpathy(root / "dataset_synth.json", split="test")
    Path(corpus.image_paths[1]).write_bytes(b"not a png")
    first, c1 = load_images(corpus, 64, cache_dir=root, progress=False)
    second, c2 = load_images(load_karpathy(root / "dataset_synth.json", split="test"), 64, cache_dir=root,
                             progress=False)
    assert first.shape == second.shape == (7, 3, 64, 64)
    np.testing.assert_array_equal(first, second)
    assert c1.image_paths == c2.image_paths


@pytest.fixture(scope="module")
def built_cache(teachers, synth_root, tmp_path_factory):
    """A teacher cache written by `mcad cache` from the session's two-step teachers."""
    from mcad.distill.cache import main as cache_main

    out = tmp_path_factory.mktemp("tcache") / "cache"
    assert cache_main([f"data={synth_root}", f"teachers={teachers}", f"cache={out}", "threads=1"]) == 0
    return out


def _retrained_copy(teachers: Path, dst: Path) -> Path:
    """The teachers' folder with the dual teacher "retrained" (`seed=7`): other weights, same shapes."""
    import shutil

    from mcad.models.checkpoint import load_model, save_model

    shutil.copytree(teachers, dst, ignore=shutil.ignore_patterns("cache"))
    dual = load_model(dst / "dual.safetensors")
    with torch.no_grad():
        next(dual.parameters()).add_(0.01)
    save_model(dual, dst / "dual.safetensors")
    return dst


def test_teacher_cache_refuses_other_teachers_with_the_rebuild_command(built_cache, teachers, synth_root, tmp_path):
    from mcad.data.images import data_key
    from mcad.distill.cache import TeacherCache
    from mcad.distill.recipe import main as student_main
    from mcad.distill.teachers import load_split

    pixels, corpus = load_split(synth_root, "train", 64)
    cache = TeacherCache(built_cache)
    cache.check(len(pixels), corpus.image_captions(), teachers=teachers, data=data_key(pixels, corpus.captions))
    other = _retrained_copy(teachers, tmp_path / "teachers7")
    with pytest.raises(ValueError, match=r"other teachers \(dual.safetensors.*`mcad cache teachers="):
        cache.check(len(pixels), corpus.image_captions(), teachers=other)
    # and through `mcad student`, which said "teachers: from the cache" and distilled from the old ones
    with pytest.raises(ValueError, match="other teachers"):
        student_main([f"data={synth_root}", f"teachers={other}", f"cache={built_cache}", f"out={tmp_path}",
                      "steps=1", "batch_size=8", "threads=1"])


def test_teacher_cache_refuses_other_data_and_damaged_shards(built_cache, synth_root, tmp_path):
    import shutil

    from mcad.distill.cache import TeacherCache
    from mcad.distill.teachers import load_split

    pixels, corpus = load_split(synth_root, "train", 64)
    cache = TeacherCache(built_cache)
    other = pixels.copy()
    other[0, 0, 0, 0] ^= 1  # same sizes, same caption table: only the content says it is other data
    from mcad.data.images import data_key

    with pytest.raises(ValueError, match="other images or captions"):
        cache.check(len(pixels), corpus.image_captions(), data=data_key(other, corpus.captions))
    broken = tmp_path / "c"
    shutil.copytree(built_cache, broken)
    shard = broken / "shard-00000.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-5] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="shard-00000.safetensors: shard content differs"):
        TeacherCache(broken)


def test_teachers_refuse_models_and_checkpoints_of_another_recipe(synth_root, tmp_path, monkeypatch):
    from mcad.distill import teachers
    from mcad.distill.teachers import main

    out = tmp_path / "teachers"
    args = [f"data={synth_root}", f"out={out}", "dual.steps=2", "fusion.steps=1", "dual.batch_size=16",
            "fusion.batch_size=8", "threads=1", "eval.rerank_k=4", "dual.ckpt_every=1"]
    assert main(args) == 0
    record = (out / "metrics.json").read_text()
    with pytest.raises(ValueError, match=r"dual.safetensors: trained with another recipe \(differs in dual.steps\)"):
        main([*args, "dual.steps=3"])
    assert (out / "metrics.json").read_text() == record  # no false record of the new config
    with pytest.raises(ValueError, match=r"fusion.safetensors: trained with another recipe \(differs in fusion.lr\)"):
        main([*args, "fusion.lr=1e-4"])
    # a partial training checkpoint of another recipe is not resumed either: a run stopped after its
    # last checkpoint but before the model was saved (a finished model removes its checkpoint)
    (out / "dual.safetensors").unlink()
    (out / "fusion.safetensors").unlink()
    assert not (out / "dual.ckpt.pt").exists()

    def stopped(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(teachers, "save_model", stopped)
        with pytest.raises(KeyboardInterrupt):
            main(args)
    assert (out / "dual.ckpt.pt").exists()
    with pytest.raises(ValueError, match=r"dual.ckpt.pt: checkpoint of another recipe \(differs in dual.steps\)"):
        main([*args, "dual.steps=3"])


# -- 3. recorded hashes verified; saving deterministic -----------------------------------------
def test_checkpoint_with_flipped_bytes_is_refused(tmp_path, capsys):
    from mcad.cli import main as cli
    from mcad.models.checkpoint import CheckpointError, load_model, save_model
    from mcad.models.registry import create_model

    torch.manual_seed(0)
    path = save_model(create_model("student-tiny"), tmp_path / "student.safetensors")
    raw = bytearray(path.read_bytes())
    for i in range(len(raw) // 2, len(raw) // 2 + 4):  # same size, inside the weights
        raw[i] ^= 0x5A
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"student.safetensors: content does not match the sha256"):
        load_model(path)
    assert cli(["eval", str(path)]) == 1
    err = error_lines(capsys)
    assert len(err) == 1 and "student.safetensors" in err[0]


def test_saving_the_same_weights_gives_the_same_bytes(tmp_path):
    from mcad.models.checkpoint import load_model, save_model
    from mcad.models.registry import create_model

    torch.manual_seed(0)
    model = create_model("student-tiny")
    files = [save_model(model, tmp_path / f"m{i}.safetensors", extra={"variant": "mcad", "seed": 0}).read_bytes()
             for i in range(4)]
    assert all(f == files[0] for f in files)
    again = save_model(load_model(tmp_path / "m0.safetensors"), tmp_path / "again.safetensors",
                       extra={"seed": 0, "variant": "mcad"})
    assert again.read_bytes() == files[0]  # a reloaded (or re-run) model saves to the same bytes


def test_damaged_faiss_index_is_refused(tmp_path):
    faiss = pytest.importorskip("faiss")
    from mcad.search import store
    from mcad.search.common import SearchError

    emb = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    index = faiss.IndexFlatIP(8)
    index.add(emb)
    folder = store.IndexFolder(tmp_path / "idx", {"kind": "search-index", "index": {"type": "flat"}}, index,
                               [f"/img/{i}.png" for i in range(50)], emb)
    store.save(folder)
    assert store.load(tmp_path / "idx").index.ntotal == 50
    f = tmp_path / "idx" / folder.manifest["files"]["index"]["path"]
    raw = bytearray(f.read_bytes())
    raw[-7] ^= 0x40  # a vector's bits: same size, still a readable faiss file
    f.write_bytes(bytes(raw))
    with pytest.raises(SearchError, match=r"\.faiss: content differs from the sha256"):
        store.load(tmp_path / "idx")


# -- 4. mismatches ------------------------------------------------------------------------------
def test_tokenizer_of_another_vocabulary_or_context_is_refused(tiny_run, synth_root, tmp_path, capsys):
    from mcad.cli import main as cli
    from mcad.data.karpathy import load_karpathy
    from mcad.models.checkpoint import CheckpointError
    from mcad.runs import load_student
    from mcad.tokenizer import train_bpe

    caps = load_karpathy(synth_root / "dataset_synth.json", split="train").captions
    for i, (vocab, ctx) in enumerate([(128, 24), (256, 16)]):
        tok = tmp_path / f"tok{i}.json"
        train_bpe(caps, vocab_size=vocab, context_length=ctx).save(tok)
        assert cli(["eval", str(tiny_run / "student.safetensors"), f"tokenizer={tok}", f"data={synth_root}"]) == 1
        err = error_lines(capsys)
        assert len(err) == 1 and f"tok{i}.json: tokenizer does not match" in err[0], err
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    shutil.copy(tmp_path / "tok1.json", run / "tokenizer.json")
    with pytest.raises(CheckpointError, match="context_length 16 vs 24"):
        load_student(run)


def test_non_fusion_checkpoint_as_fusion_is_one_line(tiny_run, synth_root, capsys):
    from mcad.cli import main as cli

    ckpt = tiny_run / "student.safetensors"
    assert cli(["eval", str(ckpt), f"fusion={ckpt}", f"data={synth_root}"]) == 1
    err = error_lines(capsys)
    assert len(err) == 1 and "expected a fusion model for fusion=" in err[0], err


# -- 5. inputs read wrongly without a count ----------------------------------------------------
@pytest.fixture
def img_dir(tmp_path):
    d = tmp_path / "data"
    (d / "img").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (20, 20), (80 * i, 40, 200)).save(d / "img" / f"{i}.png")
    return d


def test_csv_unclosed_quote_is_one_bad_row_not_the_rest_of_the_file(img_dir):
    from mcad.data.csv_data import load_csv

    path = img_dir / "pairs.csv"
    path.write_text('filepath,caption\nimg/0.png,"a red circle\nimg/1.png,a blue square\nimg/2.png,a green cross\n')
    c = load_csv(path)
    assert c.captions == ["a blue square", "a green cross"]
    assert [(w.rsplit("/", 1)[-1], p) for w, p in c.report.problems] == [("pairs.csv:2", "malformed row (unclosed quote)")]


def test_image_paths_that_leave_the_image_root_are_counted(img_dir, tmp_path):
    from mcad.data.csv_data import load_csv
    from mcad.data.karpathy import load_karpathy

    secret = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(secret)
    root = img_dir / "img"
    path = img_dir / "pairs.csv"
    path.write_text(f"filepath,caption\n0.png,inside\n../../secret.png,dot dot\n{secret},absolute\n"
                    f"../img/1.png,inside after dot dot\n{root / '2.png'},absolute inside\n")
    c = load_csv(path, image_root=root)
    assert c.captions == ["inside", "inside after dot dot", "absolute inside"]
    assert c.report.counts() == {"path leaves the image root": 2}
    entries = [{"filename": "0.png", "split": "test", "sentences": [{"raw": "fine"}]},
               {"filepath": "../..", "filename": "secret.png", "split": "test", "sentences": [{"raw": "out"}]},
               {"filepath": str(tmp_path), "filename": "secret.png", "split": "test", "sentences": [{"raw": "abs"}]}]
    js = img_dir / "k.json"
    js.write_text(json.dumps({"images": entries}))
    k = load_karpathy(js, image_root=root, split="test")
    assert k.captions == ["fine"] and k.report.counts() == {"path leaves the image root": 2}


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (a decompression bomb's calling card)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_by_a_pixel_limit_and_counted(img_dir):
    import warnings

    from mcad.data.csv_data import load_csv
    from mcad.data.images import ImageTooLarge, decode_image, load_images

    bomb = img_dir / "img" / "bomb.png"
    bomb.write_bytes(_png_header_only(12000, 12000))  # 144 Mpx: between PIL's warning and its error
    assert bomb.stat().st_size < 300
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused on the header, not decoded with a warning
        with pytest.raises(ImageTooLarge, match="12000 x 12000"):
            decode_image(bomb, 64)
    path = img_dir / "pairs.csv"
    path.write_text("filepath,caption\nimg/0.png,fine\nimg/bomb.png,boom\n")
    pixels, c = load_images(load_csv(path), 16, progress=False)
    assert len(pixels) == 1 and c.captions == ["fine"]
    assert c.report.counts() == {"image too large": 1}


def test_index_folder_symlinks_stay_inside_and_loops_end(tmp_path):
    from mcad.search.index import scan_folder

    gallery, elsewhere = tmp_path / "gallery", tmp_path / "elsewhere"
    (gallery / "a").mkdir(parents=True)
    elsewhere.mkdir()
    for p in (gallery / "a" / "x.png", gallery / "y.jpg", elsewhere / "private.png"):
        Image.new("RGB", (8, 8)).save(p)
    (gallery / "out").symlink_to(elsewhere, target_is_directory=True)      # a folder outside
    (gallery / "leak.png").symlink_to(elsewhere / "private.png")           # a file outside
    (gallery / "a" / "loop").symlink_to(gallery, target_is_directory=True)  # a loop back up
    (gallery / "same.png").symlink_to(gallery / "y.jpg")                   # inside: indexed once
    got = scan_folder(gallery)
    assert sorted(Path(p).name for p in got) == ["x.png", "y.jpg"]


def _fuzz_csv_rows(rng: random.Random, n: int) -> list[str]:
    """Rows of the kinds real CSVs break in: open or stray quotes, NULs, wrong column counts, empty
    fields, paths out of the root, missing files, stray \\r, odd Unicode."""
    good = ["img/0.png", "img/1.png", "img/2.png"]
    bad_paths = ["img/none.png", "../img/0.png", "/etc/passwd", "", "  ", "img/0.png\x00x"]
    caps = ["a red circle", '"quoted, with comma"', '"open quote', 'mid"quote', '"a""b"', "", "   ",
            "tab\there", "line\rbreak", "caf\u00e9 \u2028 sep", "\x0cform feed", '"closed" tail']
    rows = []
    for _ in range(n):
        path = rng.choice(good) if rng.random() < 0.6 else rng.choice(bad_paths)
        fields = [path, rng.choice(caps)]
        r = rng.random()
        if r < 0.1:
            fields.append("extra")
        elif r < 0.15:
            fields = fields[:1]
        rows.append(",".join(fields))
    return rows


def test_fuzz_csv_every_row_loads_or_is_counted(img_dir):
    from mcad.data.csv_data import load_csv

    rng = random.Random(0)
    for trial in range(30):
        rows = _fuzz_csv_rows(rng, rng.randint(1, 25))
        path = img_dir / f"fuzz{trial}.csv"
        path.write_text("filepath,caption\n" + "\n".join(rows) + "\n")
        n_rows = sum(1 for r in rows if r.strip())
        try:
            c = load_csv(path)
        except DataError as e:  # nothing usable: one line naming the file, with the count
            assert path.name in str(e) and f"{n_rows} rows skipped" in str(e), str(e)
            continue
        assert c.n_captions + len(c.report.problems) == n_rows, (trial, rows, c.report.problems)


def _fuzz_karpathy_entries(rng: random.Random, n: int) -> list:
    def sentence():
        return rng.choice([{"raw": "a red circle"}, {"raw": ""}, {"raw": 3}, {"tokens": []}, "plain text",
                           None, {"raw": ["list"]}, {"raw": "  spaced   out "}])

    entries = []
    for _ in range(n):
        e = {"filename": rng.choice(["0.png", "1.png", "2.png", "none.png", 7, "", None, ["x"], "../../x.png"]),
             "split": rng.choice(["test", "test", "train", 5, ["test"], None]),
             "sentences": rng.choice([[sentence() for _ in range(rng.randint(0, 3))], "a string", 4, None])}
        if rng.random() < 0.2:
            e["filepath"] = rng.choice(["", "sub", 3, None, "../.."])
        if rng.random() < 0.1:
            e.pop("filename")
        entries.append(rng.choice([e, e, e, e, "not an entry", 5]))
    return entries


def test_fuzz_karpathy_every_entry_and_sentence_loads_or_is_counted(img_dir):
    import re

    from mcad.data.karpathy import SPLIT_ALIASES, entry_problem, load_karpathy

    rng = random.Random(1)
    root = img_dir / "img"
    for trial in range(40):
        entries = _fuzz_karpathy_entries(rng, rng.randint(1, 12))
        path = img_dir / f"fuzz{trial}.json"
        path.write_text(json.dumps({"images": entries}))
        try:
            c = load_karpathy(path, image_root=root, split="test")
        except DataError as e:  # nothing usable: one line naming the file
            assert path.name in str(e) and "\n" not in str(e), str(e)
            continue
        entry_level, sentence_level = {}, {}
        for where, _ in c.report.problems:  # each problem names its entry, and its sentence if one
            m = re.search(r"\[images\]\[(\d+)\](?:\[sentences\]\[(\d+)\])?", where)
            assert m, where
            k = int(m[1])
            if m[2] is None:
                entry_level[k] = entry_level.get(k, 0) + 1
            else:
                sentence_level.setdefault(k, set()).add(int(m[2]))
        caps_of = iter(c.image_captions())
        for k, e in enumerate(entries):
            n_sent = len(e.get("sentences") or []) if isinstance(e, dict) and not entry_problem(e) else 0
            if entry_problem(e):
                assert entry_level.get(k) == 1 and k not in sentence_level, (trial, k, e)
            elif e.get("split") not in SPLIT_ALIASES["test"]:
                assert k not in entry_level and k not in sentence_level, (trial, k, e)
            elif k in entry_level:  # not loaded: one line for the entry (its sentences may be named too)
                assert entry_level[k] == 1, (trial, k, e)
                assert len(sentence_level.get(k, ())) in (0, n_sent), (trial, k, e)
            else:  # loaded: each sentence is a caption or a counted problem
                assert len(next(caps_of)) + len(sentence_level.get(k, ())) == n_sent, (trial, k, e)
        assert next(caps_of, None) is None


def _damage(rng: random.Random, raw: bytes) -> bytes:
    """The ways a file gets damaged at rest or in a copy: 1-8 bytes flipped anywhere (header
    included), a truncation, or bytes appended."""
    r = rng.random()
    if r < 0.15:
        return raw[:rng.randrange(0, len(raw))]
    if r < 0.25:
        return raw + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    out = bytearray(raw)
    for _ in range(rng.randint(1, 8)):
        out[rng.randrange(len(out))] ^= rng.randint(1, 255)
    return bytes(out)


def test_fuzz_bench_artifacts_with_damaged_bytes_are_refused_before_timing(tiny_run, tmp_path):
    """Every damaged .onnx/.tflite/.pte of an export is refused by the bench's loading (the step
    before any job is timed) with one line naming the file and the command that rebuilds it."""
    import shutil

    from mcad.artifacts import ManifestError
    from mcad.benchmarks.subjects import student_subject
    from test_verification import fake_export

    rng = random.Random(2)
    runtimes = {".onnx": "onnxruntime", ".tflite": "litert", ".pte": "executorch"}
    for trial in range(24):
        ext = (".onnx", ".tflite", ".pte")[trial % 3]
        run = tmp_path / f"run{trial}"
        shutil.copytree(tiny_run, run)
        f = fake_export(run, files=(f"text_encoder.int8{ext}",), seed=trial) / f"text_encoder.int8{ext}"
        raw = f.read_bytes()
        f.write_bytes(_damage(rng, raw))
        if f.read_bytes() == raw:  # an xor is never 0, but a truncation to the whole file could be
            continue
        with pytest.raises(ManifestError) as e:
            student_subject(run, tmp_path, [runtimes[ext]], None, ["a red circle"])
        msg = str(e.value)
        assert msg.startswith(f"{f}: sha256 differs from ") and "\n" not in msg, msg
        assert f"rebuild: `make export TARGET=cpu RUN={run}`" in msg, msg


def test_fuzz_resume_checkpoints_with_damaged_bytes_are_refused(tmp_path):
    """Every damaged resume checkpoint is refused in one line naming it, never resumed."""
    from mcad.distill.trainer import DamagedCheckpoint, Trainer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    cfg = {"steps": 3, "lr": 1e-2, "ckpt_every": 1}
    ckpt = tmp_path / "student.ckpt.pt"
    tr = Trainer({"m": model}, cfg, ckpt, desc="t", recipe=cfg)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    tr.fit(lambda step: ((model(x) ** 2).mean(), {}), stop_at=2, progress=False)
    raw = ckpt.read_bytes()
    rng = random.Random(3)
    for trial in range(40):
        damaged = _damage(rng, raw)
        if damaged == raw:
            continue
        ckpt.write_bytes(damaged)
        with pytest.raises(DamagedCheckpoint) as e:
            Trainer({"m": model}, cfg, ckpt, desc="t", recipe=cfg).resume()
        msg = str(e.value)
        assert msg.startswith(f"{ckpt}: damaged training checkpoint (") and "\n" not in msg, (trial, msg)
    ckpt.write_bytes(raw)
    assert Trainer({"m": model}, cfg, ckpt, desc="t", recipe=cfg).resume()  # the intact file still resumes


# -- 6. numbers that make no sense --------------------------------------------------------------
def test_counts_are_checked_at_each_command_naming_the_key(tmp_path, synth_root, teachers):
    from mcad.data.cli import make_synthetic
    from mcad.distill.cache import main as cache_main
    from mcad.distill.recipe import main as student_main
    from mcad.distill.teachers import main as teachers_main
    from mcad.distill.trainer import Trainer

    with pytest.raises(ValueError, match=r"n_train=-4: must be an integer >= 0"):
        make_synthetic({"out": str(tmp_path / "d"), "n_train": -4, "progress": False})
    assert not (tmp_path / "d" / "dataset_synth.json").exists()
    with pytest.raises(ValueError, match=r"dual.steps=-5: must be a positive integer"):
        teachers_main([f"data={synth_root}", f"out={tmp_path / 't'}", "dual.steps=-5"])
    with pytest.raises(ValueError, match=r"fusion.batch_size=0"):
        teachers_main([f"data={synth_root}", f"out={tmp_path / 't'}", "fusion.batch_size=0"])
    with pytest.raises(ValueError, match=r"^steps=-5: must be a positive integer"):
        student_main([f"data={synth_root}", f"teachers={teachers}", f"out={tmp_path}", "steps=-5"])
    with pytest.raises(ValueError, match=r"^neighbours=0: must be a positive integer"):
        cache_main([f"data={synth_root}", f"teachers={teachers}", f"cache={tmp_path / 'c'}", "neighbours=0"])
    with pytest.raises(ValueError, match=r"steps=-5"):  # and the loop itself never "trains" nothing
        Trainer({"m": torch.nn.Linear(2, 2)}, {"steps": -5, "lr": 1e-3})


@pytest.mark.parametrize("text, key", [
    ("- a\n- b\n", "the top level"),
    ("devices: [local]\n", "'devices:' mapping"),
    ("devices:\n  local: [1, 2]\n", "devices.local"),
    ("devices:\n  local:\n    budgets: 3\n", "devices.local"),
    ("devices:\n  local:\n    budgets:\n      student: [1000]\n", "devices.local.budgets.student"),
    ("devices:\n  local:\n    budgets:\n      student:\n        1000: 8\n", "devices.local.budgets.student.1000"),
    ("devices:\n  local:\n    budgets:\n      student:\n        1000: {p50_ms: fast}\n",
     "devices.local.budgets.student.1000.p50_ms: 'fast' is not a positive number"),
    ("devices:\n  local:\n    match: local\n    budgets: {}\n", "devices.local.match"),
])
def test_budgets_file_schema_is_one_line_at_load(tmp_path, text, key):
    from mcad.benchmarks.budgets import load_budgets

    path = tmp_path / "budgets.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as e:
        load_budgets(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and key in msg and "\n" not in msg, msg


# -- 7/8. Ctrl-C, files -------------------------------------------------------------------------
def _interrupted_run(tmp_path, interrupt_at=None, steps=6):
    import signal

    from mcad.distill.sampling import RandomBatches
    from mcad.distill.trainer import Trainer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    cfg = {"steps": steps, "lr": 1e-2, "warmup": 2, "ckpt_every": 100}
    tr = Trainer({"m": model}, cfg, tmp_path / "ckpt.pt", desc="t", recipe=cfg)
    tr.resume()
    batches = RandomBatches(64, 8, seed=3)
    data = torch.randn(64, 8, generator=torch.Generator().manual_seed(5))

    def loss_fn(step):
        if step == interrupt_at:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C in the middle of a step
        x = data[batches(step)]
        return ((model(x) - torch.randn(x.shape[0], 4)) ** 2).mean(), {}

    tr.fit(loss_fn, progress=False)
    return model


def test_ctrl_c_saves_the_step_and_says_where_and_resume_is_exact(tmp_path):
    import signal

    from mcad.distill.trainer import TrainingInterrupted

    # as in a terminal: a suite started in the background (CI, nohup) inherits SIGINT ignored,
    # and the trainer rightly leaves an ignored Ctrl-C alone
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _ctrl_c_then_resume(tmp_path, TrainingInterrupted)
    finally:
        signal.signal(signal.SIGINT, old)


def _ctrl_c_then_resume(tmp_path, TrainingInterrupted):
    full = _interrupted_run(tmp_path / "a")
    with pytest.raises(TrainingInterrupted) as e:
        _interrupted_run(tmp_path / "b", interrupt_at=2)
    msg = str(e.value)
    assert "\n" not in msg and f"saved {tmp_path / 'b' / 'ckpt.pt'} (step 3)" in msg, msg
    resumed = _interrupted_run(tmp_path / "b")
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k


def test_ctrl_c_in_any_command_is_one_line(monkeypatch, capsys):
    import sys
    import types

    from mcad import cli
    from mcad.distill.trainer import TrainingInterrupted

    def main(argv):
        raise TrainingInterrupted("student: interrupted at step 3 of 9; saved runs/x/student.ckpt.pt (step 3)")

    monkeypatch.setitem(sys.modules, "fake_mcad_command", types.SimpleNamespace(main=main))
    monkeypatch.setitem(cli.COMMANDS, "fake", ("fake_mcad_command", ""))
    assert cli.main(["fake"]) == 130
    assert error_lines(capsys) == ["mcad fake: interrupted: student: interrupted at step 3 of 9; "
                                   "saved runs/x/student.ckpt.pt (step 3)"]


def test_written_files_get_the_umask_mode_and_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    from mcad import io as mio
    from mcad.models.checkpoint import save_model
    from mcad.models.registry import create_model

    old = os.umask(0o027)
    try:
        j = mio.write_json(tmp_path / "a.json", {"x": 1})
        ck = save_model(create_model("student-tiny"), tmp_path / "m.safetensors")
        with mio.atomic_path(tmp_path / "t.pt") as tmp:
            torch.save({"x": 1}, tmp)
    finally:
        os.umask(old)
    for p in (j, ck, tmp_path / "m.config.json", tmp_path / "t.pt"):
        assert p.stat().st_mode & 0o777 == 0o640, p
    os.chmod(j, 0o604)  # an existing file keeps the mode its owner gave it
    mio.write_json(j, {"x": 2})
    assert j.stat().st_mode & 0o777 == 0o604

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(f"replace {Path(b).name}"), real_replace(a, b))[1])
    with mio.atomic_path(tmp_path / "ckpt.pt") as tmp:  # torch.save itself never fsyncs
        torch.save({"x": 1}, tmp)
    assert events == ["fsync", "replace ckpt.pt"]


def test_temp_files_of_killed_saves_are_swept_on_start(tmp_path):
    import subprocess
    import time

    from mcad.distill.trainer import Trainer

    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    killed = run / f".student.ckpt.pt.{dead.pid}.abcd1234.tmp"       # its writer is gone
    in_flight = run / f".metrics.json.{os.getppid()}.abcd1234.tmp"   # its writer is alive
    legacy_old = run / ".student.ckpt.pt.k3j_x9q2.tmp"              # the old naming, a day old
    legacy_new = run / ".student.ckpt.pt.z8y7x6w5.tmp"              # the old naming, just now
    mine = run / "notes.tmp"                                        # not a temp name of ours
    for p in (killed, in_flight, legacy_old, legacy_new, mine):
        p.write_bytes(b"partial")
    day_ago = time.time() - 86400
    os.utime(legacy_old, (day_ago, day_ago))
    Trainer({"m": torch.nn.Linear(2, 2)}, {"steps": 1, "lr": 1e-3}, run / "student.ckpt.pt").resume()
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in (in_flight, legacy_new, mine))


def test_files_named_in_errors_non_utf8_json_and_csv_byte_offset(tmp_path):
    import codecs

    from mcad.data.csv_data import load_csv
    from mcad.io import read_json

    bad = tmp_path / "latin1.json"
    bad.write_bytes('{"caption": "caf\u00e9"}'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.json: not UTF-8"):
        read_json(bad)
    head = b"filepath,caption\nimg/a.png,caf"
    csv_path = tmp_path / "bom.csv"
    csv_path.write_bytes(codecs.BOM_UTF8 + head + b"\xe9\n")
    with pytest.raises(DataError, match=rf"bom.csv: not UTF-8 text \(invalid continuation byte at byte {3 + len(head)}, line 2\)"):
        load_csv(csv_path)


def test_data_out_under_a_file_is_one_line(tmp_path, capsys):
    from mcad.cli import main as cli

    f = tmp_path / "file"
    f.write_text("x")
    assert cli(["data", f"out={f / 'synth'}", "n_train=8", "n_val=4", "n_test=8", "progress=false"]) == 1
    err = error_lines(capsys)
    assert len(err) == 1 and "cannot create the data folder" in err[0], err


def test_eval_json_that_cannot_be_written_is_one_line_before_any_work(tmp_path, capsys):
    """json=<a path under a file> used to fail after the whole evaluation; now before any loading."""
    from mcad.cli import main

    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    assert main(["eval", str(tmp_path / "no-such.safetensors"), f"json={a_file / 'out.json'}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "json=" in err[0] and "cannot be written" in err[0], err
    assert main(["eval", str(tmp_path / "no-such.safetensors"), f"json={tmp_path}"]) == 1
    assert "is a folder" in capsys.readouterr().err
    assert a_file.read_text() == "mine"
