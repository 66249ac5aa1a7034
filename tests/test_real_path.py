"""The real path end to end on CPU, with real classes and real files: tiny randomly initialised
transformers CLIPModel and BlipForImageTextRetrieval saved with save_pretrained (with their tokenizer
files), a fixture of PNG/JPEG files in Karpathy JSON, CSV and webdataset form, then `mcad cache` ->
`mcad student` (two steps) -> `mcad export target=cpu` through the shipped flickr30k recipe with
its path keys overridden, as docs/real-data.md tells a user to. Plus the bad inputs of this path,
one line each."""
from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_hf_teachers import MEAN, STD, save_tiny_blip  # noqa: E402  (tests/ is on sys.path)
from test_tokenizer_clip import corpus as tokenizer_corpus  # noqa: E402

from tiny_hf import save_tiny_clip  # noqa: E402

pytestmark = pytest.mark.slow

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}
SHAPES = ("circle", "square")
N_TRAIN, N_TEST = 16, 6
CLIP_SIZE, BLIP_SIZE = 64, 32  # the fusion teacher sees another size than the dual one (and the student)
TIMES: dict[str, float] = {}


# -- fixture: teachers ---------------------------------------------------------------------------------
def save_clip(folder, image_size=CLIP_SIZE):
    return save_tiny_clip(folder, image_size, MEAN, STD, patch_size=16)


def save_blip(folder):
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    words = "circle square left right of above below green blue yellow".split()
    shutil.rmtree(save_tiny_blip(folder, words, image_size=BLIP_SIZE))  # the vocab source: not a user's file
    BlipImageProcessorPil(size={"height": BLIP_SIZE, "width": BLIP_SIZE}, image_mean=MEAN[::-1],
                          image_std=STD[::-1]).save_pretrained(str(folder))  # its own mean/std, as BLIP has
    return folder


# -- fixture: data in the three real formats ------------------------------------------------------------
def scene(i: int) -> tuple[str, str, str, str]:
    names = list(COLOURS)
    return names[i % 4], SHAPES[(i // 4) % 2], names[(i + 1 + i // 8) % 4], SHAPES[(i // 2) % 2]


def draw(i: int):
    from PIL import Image, ImageDraw

    c1, s1, c2, s2 = scene(i)
    w, h = (96, 72) if i % 3 else (64, 88)  # not square: the loader's centre crop is part of the path
    im = Image.new("RGB", (w, h), (245, 245, 245))
    d = ImageDraw.Draw(im)
    for (c, s), box in (((c1, s1), (4, h // 2 - 14, 32, h // 2 + 14)), ((c2, s2), (w - 32, h // 2 - 14, w - 4, h // 2 + 14))):
        (d.ellipse if s == "circle" else d.rectangle)(box, fill=COLOURS[c])
    return im


def captions(i: int) -> list[str]:
    c1, s1, c2, s2 = scene(i)
    return [f"a {c1} {s1} left of a {c2} {s2}", f"A {c2} {s2} to the right of a {c1} {s1}."]


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """Teacher folders and one data set written as Karpathy JSON, CSV (per split) and wds shards."""
    import webdataset as wds

    t0 = time.time()
    root = tmp_path_factory.mktemp("real")
    clip, blip = save_clip(root / "clip-vit-tiny"), save_blip(root / "blip-itm-tiny")
    TIMES["teacher folders (save_pretrained)"] = time.time() - t0
    imgs = root / "data" / "images"
    imgs.mkdir(parents=True)
    entries, rows = [], {"train": [], "test": []}
    for i in range(N_TRAIN + N_TEST):
        split = "train" if i < N_TRAIN else "test"
        name = f"{i:03d}." + ("png" if i % 2 else "jpg")
        draw(i).save(imgs / name, quality=95)
        entries.append({"filename": name, "filepath": "", "split": split, "imgid": i,
                        "sentences": [{"raw": c, "sentid": 2 * i + j} for j, c in enumerate(captions(i))]})
        rows[split] += [(name, c) for c in captions(i)]
    kj = root / "data" / "dataset_fixture.json"
    kj.write_text(json.dumps({"dataset": "fixture", "images": entries}))
    for split, r in rows.items():
        lines = ["filepath,caption"] + [f'{n},"{c}"' for n, c in r]
        (root / "data" / f"{split}.csv").write_text("\n".join(lines) + "\n")
        with wds.TarWriter(str(root / "data" / f"{split}-000000.tar")) as w:
            for n in dict.fromkeys(n for n, _ in r):  # one sample per image: its first caption
                i = int(n[:3])
                w.write({"__key__": n[:3], n[4:]: (imgs / n).read_bytes(), "txt": captions(i)[0]})
    return {"root": root, "clip": clip, "blip": blip, "json": kj, "images": imgs,
            "csv": {s: root / "data" / f"{s}.csv" for s in rows},
            "shards": {s: root / "data" / f"{s}-000000.tar" for s in rows}}


def recipe_args(real, out) -> list[str]:
    """What docs/real-data.md passes to the flickr30k recipe, at a fixture's budget."""
    return [f"data.json={real['json']}", f"data.image_root={real['images']}", f"dual.path={real['clip']}",
            f"fusion.path={real['blip']}", f"out={out}", "threads=1", "device=auto"]


def cli(argv, capsys) -> tuple[int, list[str]]:
    from mcad.cli import main

    code = main(argv)
    # stderr also carries progress bars (transformers' "Loading weights", decoding): the lines of mcad itself
    return code, [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.startswith("mcad ")]


# -- the path ----------------------------------------------------------------------------------------------
def test_cache_student_export_on_real_files(real, tmp_path, capsys):
    from mcad.cli import main
    from mcad.models.hf_teachers import CLIPTeacher
    from mcad.runs import load_student
    from mcad.tokenizer import Tokenizer

    common = ["flickr30k", *recipe_args(real, tmp_path)]
    t0 = time.time()
    assert main(["cache", *common, "cache_shard_images=8"]) == 0
    TIMES["mcad cache (16 images, 32 captions)"] = time.time() - t0
    cache_dirs = list((tmp_path / "teacher-cache").iterdir())
    assert len(cache_dirs) == 1  # keyed by these teachers and data, not runs/teachers/cache
    mf = json.loads((cache_dirs[0] / "manifest.json").read_text())
    assert mf["images"] == N_TRAIN and mf["captions"] == 2 * N_TRAIN and len(mf["shards"]) == 2
    hashes = mf["config"]["teachers"]
    assert {"dual/model.safetensors", "dual/tokenizer.json", "fusion/model.safetensors", "fusion/config.json"} <= set(hashes)
    assert mf["config"]["teacher_specs"] == {"dual": f"hf-clip:{real['clip']}", "fusion": f"hf-blip-itm:{real['blip']}"}

    t0 = time.time()
    assert main(["student", *common, "name=real", "steps=2", "batch_size=8", "warmup=1", "ckpt_every=0",
                 "adapters.steps=2", "adapters.batch_size=8"]) == 0
    TIMES["mcad student (2 steps, batch 8)"] = time.time() - t0
    run = tmp_path / "real"
    m = json.loads((run / "metrics.json").read_text())
    assert m["teacher_outputs"] == f"cache {cache_dirs[0]}" and m["device"] == "cpu"
    assert m["teachers"] == mf["config"]["teacher_specs"]
    assert set(m["test"]) == {"student", "dual teacher"}  # runs/teachers' own metrics are not these teachers'
    # the student: student-mobile at the dual teacher's size and mean/std, with its tokenizer
    model, tok = load_student(run)
    teacher = CLIPTeacher.from_pretrained(real["clip"])
    assert model.config["name"] == "student-mobile" and model.image_size == CLIP_SIZE
    assert list(model.image_mean) == pytest.approx(MEAN) and list(model.image_std) == pytest.approx(STD)
    assert m["preprocess"]["image_size"] == CLIP_SIZE and m["preprocess"]["image_mean"] == pytest.approx(MEAN)
    texts = tokenizer_corpus(200)
    assert tok.kind == "clip" and tok.context_length == 77 == model.context_length
    assert np.array_equal(tok.encode_batch(texts), teacher.tokenizer.encode_batch(texts))
    assert np.array_equal(Tokenizer.load(run / "tokenizer.json").encode_batch(texts),
                          teacher.tokenizer.encode_batch(texts))
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["teachers"]["sha256"] == hashes and manifest["tokenizer"]["kind"] == "clip"
    assert manifest["preprocess"] == m["preprocess"]

    # export: the artifacts carry the student's preprocessing and tokenizer
    t0 = time.time()
    assert main(["export", "target=cpu", f"run={run}", "backends=onnx", "precision=fp32", f"data={real['json']}",
                 "calib=8", "parity_images=4", "queries=2", "roles=text,image", "progress=0"]) == 0
    TIMES["mcad export target=cpu backends=onnx (fp32, text+image)"] = time.time() - t0
    exp = json.loads((run / "export" / "cpu" / "manifest.json").read_text())
    assert exp["image_size"] == CLIP_SIZE and exp["image_mean"] == pytest.approx(MEAN)
    assert exp["context_length"] == 77 and {a["role"] for a in exp["artifacts"]} == {"text", "image"}
    assert all(a.get("parity_pass", True) for a in exp["artifacts"])
    assert np.array_equal(Tokenizer.load(run / "export" / "cpu" / exp["tokenizer"]).encode_batch(texts),
                          teacher.tokenizer.encode_batch(texts))
    # ... and name the teachers (with their files' hashes) and the resize rule: CLIP's, not mcad's square
    assert exp["teachers"] == manifest["teachers"] and exp["teachers"]["sha256"] == hashes
    assert exp["preprocess"] == m["preprocess"] and m["preprocess"]["resize_mode"] == "shortest"

    # bench on this machine, a small gallery: the exported ONNX encoders against budgets that hold
    t0 = time.time()
    assert main(["bench", "device=local", f"run={run}", "quick=1", "galleries=200", "threads=1", "peers=none",
                 "mobile=0", "image=0", "target=cpu", f"out={tmp_path / 'bench'}", "results=none"]) == 0
    TIMES["mcad bench device=local (200 images, quick)"] = time.time() - t0
    bench = json.loads(next((tmp_path / "bench").glob("*.json")).read_text())
    assert bench["errors"] == [] and bench["rows"] and {r["subject"] for r in bench["rows"]} == {"student"}
    # a search is its parts: p50 of the whole at least the encoder's, and the parts are all timed
    for r in bench["rows"]:
        st = r["stages"]
        assert r["gallery"] == 200 and {"encode", "search"} <= set(st), st
        assert st["search"]["p50"] >= 0.5 * st["encode"]["p50"] and st["search"]["p90"] >= st["search"]["p50"]

    # index the fixture's photos with the exported image encoder, search them with the text one
    enc = run / "export" / "cpu"
    img_enc = next(enc / a["file"] for a in exp["artifacts"] if a["role"] == "image")
    txt_enc = next(enc / a["file"] for a in exp["artifacts"] if a["role"] == "text")
    assert main(["index", str(real["images"]), f"out={tmp_path / 'index'}", f"encoder={img_enc}", "type=flat",
                 "progress=0"]) == 0
    capsys.readouterr()
    assert main(["search", captions(N_TRAIN)[0], f"index={tmp_path / 'index'}", f"encoder={txt_enc}", "k=3",
                 "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["count"] == N_TRAIN + N_TEST and len(found["results"]) == 3
    # the index's embeddings are the exported encoder's on pixels decoded as training decoded them
    from mcad.data import spec
    from mcad.search.encoders import load_image_encoder

    images, corpus = spec.open_split({"format": "karpathy", "json": str(real["json"]), "image_root": str(real["images"])},
                                     "test", teacher.image_view, workers=0, progress=False)
    from pathlib import Path

    from mcad.search import store

    folder = store.load(tmp_path / "index", with_embeddings=True)
    want = load_image_encoder(encoder=img_enc)(np.concatenate(list(images.chunks(8))))
    rows_of = [folder.paths.index(str(Path(p).resolve())) for p in corpus.image_paths]
    np.testing.assert_allclose(folder.embeddings[rows_of], want, atol=1e-5)
    print("\nmeasured on the fixture:", json.dumps({k: round(v, 1) for k, v in TIMES.items()}))


def test_eval_reads_every_format_the_same(real, tmp_path):
    """`mcad eval` with the HF teachers over the same images as Karpathy JSON and as CSV gives the
    same table; webdataset shards (one caption per image) decode to the same pixels."""
    from mcad.cli import main
    from mcad.data import spec

    teach = ["dual.source=hf-clip", f"dual.path={real['clip']}", f"fusion={real['blip']}", "k=4"]
    specs = {"karpathy": [f"data={real['json']}", f"data.image_root={real['images']}"],
             "csv": ["data.format=csv", f"data.csv={{train: {real['csv']['train']}, test: {real['csv']['test']}}}",
                     f"data.image_root={real['images']}"],
             "wds": ["data.format=wds", f"data.shards={{train: {real['shards']['train']}, test: {real['shards']['test']}}}"]}
    tables = {}
    for fmt, args in specs.items():
        assert main(["eval", *teach, *args, f"json={tmp_path / fmt}.json"]) == 0
        tables[fmt] = json.loads((tmp_path / f"{fmt}.json").read_text())
    # the "data" entry names each format's own source; the split, its size and every metric agree
    data = {fmt: t.pop("data") for fmt, t in tables.items()}
    assert tables["karpathy"] == tables["csv"] and len(tables["karpathy"]) == 2  # dual + BLIP re-rank rows
    for d in data.values():
        assert d["split"] == "test" and d["images"] == data["karpathy"]["images"] > 0, data
    assert data["karpathy"]["captions"] == data["csv"]["captions"] > 0, data
    kp, kc = spec.load_split({"format": "karpathy", "json": str(real["json"]), "image_root": str(real["images"])},
                             "test", CLIP_SIZE, progress=False)
    wp, wc = spec.load_split({"format": "wds", "shards": str(real["shards"]["test"])}, "test", CLIP_SIZE, progress=False)
    assert np.array_equal(kp, wp) and wc.captions == [kc.captions[c[0]] for c in kc.image_captions()]


def test_the_loader_feeds_each_teacher_what_its_processor_would(real):
    """What every command decodes (mcad.data.spec.open_split at the teacher's view, DataLoader
    workers) is what transformers' own image processor makes of the same files: CLIP's shortest-edge
    resize + centre crop, BLIP's squash resize, each with its own mean/std; the embeddings agree."""
    from PIL import Image
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from mcad.data import spec
    from mcad.models.hf_teachers import load_teacher
    from mcad.preprocess import model_input, view_of

    data = {"format": "karpathy", "json": str(real["json"]), "image_root": str(real["images"])}
    for source, folder, proc in (("hf-clip", real["clip"], CLIPImageProcessorPil),
                                 ("hf-blip-itm", real["blip"], BlipImageProcessorPil)):
        teacher = load_teacher({"source": source, "path": str(folder)})
        images, corpus = spec.open_split(data, "train", view_of(teacher), workers=2, progress=False)
        ours = torch.cat([model_input(teacher, px) for px in images.chunks(5)])
        files = [Image.open(p).convert("RGB") for p in corpus.image_paths]
        assert {im.size[0] == im.size[1] for im in files} == {False}  # every file needs the resize rule
        ref = proc.from_pretrained(str(folder), local_files_only=True)(files, return_tensors="pt")["pixel_values"]
        assert ours.shape == ref.shape == (N_TRAIN, 3, teacher.image_size, teacher.image_size)
        assert torch.allclose(ours, ref.float(), atol=1e-4), source
        with torch.no_grad():
            a, b = teacher.encode_image(ours), teacher.encode_image(ref.float())
        assert float((a * b).sum(1).min()) >= 0.9999, source


# -- bad input on this path: one line each, naming the file and the fix -------------------------------
def test_bad_inputs_are_one_line(real, tmp_path, capsys):
    common = ["flickr30k", *recipe_args(real, tmp_path)]
    # a CLIP folder given as the fusion teacher
    code, err = cli(["cache", *common, f"fusion.path={real['clip']}"], capsys)
    assert code == 1 and len(err) == 1, err
    assert f"{real['clip'] / 'config.json'}: a CLIPModel model, not the BlipForImageTextRetrieval" in err[0]
    assert f"dual.source=hf-clip dual.path={real['clip']}" in err[0]
    # a model folder without weights
    bare = tmp_path / "no-weights"
    bare.mkdir()
    shutil.copy(real["blip"] / "config.json", bare / "config.json")
    code, err = cli(["student", *common, f"fusion.path={bare}"], capsys)
    assert code == 1 and len(err) == 1 and f"{bare}: no model weights" in err[0], err
    assert "huggingface-cli download Salesforce/blip-itm-base-coco" in err[0]
    # a split with nothing in it (the fixture has no val split)
    code, err = cli(["student", *common, "eval.split=val", "steps=1"], capsys)
    assert code == 1 and len(err) == 1, err
    assert f"{real['json']}: no usable image-caption pairs in split 'val'" in err[0]
    assert "its images per split: train 16, test 6" in err[0] and "eval.split=test" in err[0]
    # an image size the student cannot take: a CLIP whose processor crops 48 px for student-mobile
    odd = tmp_path / "clip-48"
    shutil.copytree(real["clip"], odd)
    pp = json.loads((odd / "preprocessor_config.json").read_text())
    pp["crop_size"] = {"height": 48, "width": 48}
    (odd / "preprocessor_config.json").write_text(json.dumps(pp))
    code, err = cli(["student", *common, f"dual.path={odd}"], capsys)
    assert code == 1 and len(err) == 1, err
    assert "model=student-mobile: cannot take the dual teacher's 48 px images" in err[0] and "model=student-tiny-vit" in err[0]
    # device=cuda without a GPU
    if not torch.cuda.is_available():
        code, err = cli(["cache", *common, "device=cuda"], capsys)
        assert code == 1 and err == [f"mcad cache: error: device=cuda: no CUDA GPU here (torch {torch.__version__}, "
                                     f"cuda {torch.version.cuda or 'not built in'}): use device=cpu or device=auto"]


def test_project_teachers_on_the_users_csv(real, tmp_path):
    """No checkpoints of one's own: `mcad teachers` trains the project's teachers on the user's data
    (a per-split CSV here), and `mcad student` distills from them with the same data keys."""
    from mcad.cli import main

    data = ["data.format=csv", f"data.csv={{train: {real['csv']['train']}, test: {real['csv']['test']}}}",
            f"data.image_root={real['images']}"]
    own = tmp_path / "teachers"
    assert main(["teachers", *data, f"out={own}", "dual.steps=1", "fusion.steps=1", "dual.batch_size=8",
                 "fusion.batch_size=4", "eval.rerank_k=2", "threads=1"]) == 0
    assert main(["student", *data, f"teachers={own}", f"out={tmp_path}", "name=s", "variant=dual", "steps=1",
                 "batch_size=8", "warmup=1", "threads=1"]) == 0
    m = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert m["data"].startswith("data.format=csv") and m["teacher_outputs"] == "online"
    assert any(r.startswith("fusion") for r in m["test"])  # the teachers' own evaluation, same data: reused
