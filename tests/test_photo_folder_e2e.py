"""From a folder of one's own photos and a text file of queries to a search on this machine, as
docs/real-data.md ("From your own photo folder and a text file of queries") tells a user to: real
`transformers` teachers at random init (a tiny CLIPModel and BlipForImageTextRetrieval saved with
save_pretrained), real photographs (crops of the sample photos installed packages ship,
tests/real_images.py), no caption for any training image (a handful of captioned photos only
evaluate), then `mcad cache` -> `mcad student` (model=clip init=inherit: a CLIPModel student cut from
the CLIP teacher) -> `mcad export target=cpu` -> `mcad bench device=local` -> `mcad index` ->
`mcad search`, each exit code checked; and the run's student-hf/ loads with
`transformers.CLIPModel.from_pretrained` alone, its embeddings the run's student's."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from real_images import build as build_photos  # noqa: E402  (tests/ is on sys.path)
from test_hf_teachers import MEAN, STD  # noqa: E402
from test_real_path import save_blip  # noqa: E402
from tiny_hf import save_tiny_clip  # noqa: E402

pytestmark = pytest.mark.slow

CLIP_SIZE = 32
COSTS: dict[str, float] = {}  # step -> wall seconds, printed


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """What a user brings: photos/ (no captions; nested folders), queries.txt (one a line, a blank
    line among them), captioned/test.csv beside a few captioned photos (what evaluates the student and
    calibrates its export), captioned/train.csv (a few captioned photos to train on, for the run with
    captions), and the two teacher folders. Three groups of distinct photos."""
    root = tmp_path_factory.mktemp("user")
    src = root / "src"
    entries = json.loads(build_photos(src, size=48, per_source=3, test_per_source=1).read_text())["images"]
    photos, held = root / "photos", root / "captioned"
    rows: dict[str, list[str]] = {"train": [], "test": []}
    for e in entries:
        name, j = e["filename"], int(e["filename"].rsplit("_", 1)[1][:3])
        group = "test" if e["split"] == "test" else "train" if j == 2 else "photos"
        dest = photos / name.split("_")[0] / name if group == "photos" else held / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / "images" / name, dest)
        rows.get(group, []).extend(f'{name},"{s["raw"]}"' for s in e["sentences"])
    for split, r in rows.items():
        (held / f"{split}.csv").write_text("\n".join(["filepath,caption", *r]) + "\n", encoding="utf-8")
    lines = sorted({e["sentences"][0]["raw"].split(",")[0] for e in entries}) + ["", "a photo of a dahlia"]
    (root / "queries.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    shutil.rmtree(src)
    return {"root": root, "photos": photos, "queries": root / "queries.txt", "held": held,
            "clip": save_tiny_clip(root / "clip-teacher", CLIP_SIZE, MEAN, STD, patch_size=8),
            "blip": save_blip(root / "blip-teacher"), "n_photos": sum(1 for p in photos.rglob("*") if p.is_file()),
            "n_texts": sum(1 for ln in lines if ln), "first_query": lines[0]}


def teachers_and_unpaired(f: dict, out: Path) -> list[str]:
    """The keys docs/real-data.md gives: the two teacher folders, the photo folder and the text file,
    a CLIPModel student cut from the CLIP teacher."""
    return ["dual.source=hf-clip", f"dual.path={f['clip']}", f"fusion={f['blip']}", f"unpaired.images={f['photos']}",
            f"unpaired.texts={f['queries']}", "model=clip", "init=inherit", f"out={out}", "threads=1"]


def mcad(what: str, argv: list[str], cwd: Path, capsys=None, process: bool = False) -> str:
    """One command, checked for exit 0; its stdout. In this process (`mcad.cli.main`), or with
    `process` in one of its own as a user types it. The export and the bench run in this process after
    the others on purpose: library log records forwarded to the run's log must not loop (they did).
    Wall times go to COSTS."""
    t0 = time.time()
    if process:
        r = subprocess.run([sys.executable, "-m", "mcad.cli", *argv], capture_output=True, text=True, timeout=600,
                           cwd=cwd)
        code, out, err = r.returncode, r.stdout, r.stderr
    else:
        from mcad.cli import main

        if capsys is not None:
            capsys.readouterr()
        code = main(argv)
        out, err = capsys.readouterr() if capsys is not None else ("", "")
    COSTS[what] = round(time.time() - t0, 1)
    assert code == 0, f"{what}: exit {code}\n{err[-3000:]}"
    return out


def test_photo_folder_and_queries_to_search(files, tmp_path, capsys, caplog):
    """No training caption at all: the photos and the queries alone (unpaired.paired=false)."""
    from mcad.runs import load_student

    f = files
    common = [f"data={f['held'] / 'test.csv'}", *teachers_and_unpaired(f, tmp_path / "runs"), "unpaired.paired=false"]
    mcad("mcad cache", ["cache", *common], tmp_path)
    cache = json.loads(next((tmp_path / "runs" / "teacher-cache").glob("*/unpaired/manifest.json")).read_text())
    assert (cache["images"], cache["texts"]) == (f["n_photos"], f["n_texts"])  # every photo, every non-blank line
    mcad("mcad student (4 steps)", ["student", *common, "name=photos", "steps=4", "batch_size=8", "warmup=1",
                                    "ckpt_every=0"], tmp_path)
    run = tmp_path / "runs" / "photos"
    m = json.loads((run / "metrics.json").read_text())
    assert m["teacher_outputs"] == "unpaired only" and m["config"]["init"] == "inherit"
    u = m["unpaired"]
    assert (u["images"], u["texts"]) == (f"folder {f['photos']}", f"text file {f['queries']}")
    assert (u["n_images"], u["n_texts"]) == (f["n_photos"], f["n_texts"]) and u["teacher_outputs"].startswith("cache ")
    hf_cfg = json.loads((run / "student-hf" / "config.json").read_text())
    assert hf_cfg["architectures"] == ["CLIPModel"] and hf_cfg["text_config"]["num_hidden_layers"] == 1  # of 2
    man = json.loads((run / "manifest.json").read_text())
    hf_files = {e["path"] for e in man["files"] if e["path"].startswith("student-hf/")}
    assert {"student-hf/config.json", "student-hf/model.safetensors", "student-hf/preprocessor_config.json",
            "student-hf/tokenizer.json"} <= hf_files and man["student_hf"]["folder"] == "student-hf"
    from mcad.io import sha256_file

    assert all(sha256_file(run / e["path"]) == e["sha256"] for e in man["files"])

    # the run's own student (what export reads) and transformers' own load of student-hf/ agree: on the
    # same pixels and token ids to 1e-5; on the photo files, each decoded its own way (mcad's loader at
    # the run's view; the folder's image processor), to cosine 0.9999
    from mcad.data import spec
    from mcad.preprocess import model_input

    student, tok = load_student(run)
    assert type(student).__name__ == "CLIPStudent" and student.image_size == CLIP_SIZE
    g = torch.Generator().manual_seed(0)
    photos, corpus = spec.open_split(spec.parse(str(f["held"] / "test.csv")), "test", student.image_view, workers=0,
                                     progress=False)
    x = {"px": torch.randn(3, 3, CLIP_SIZE, CLIP_SIZE, generator=g), "files": list(corpus.image_paths),
         "ids": torch.as_tensor(tok.encode_batch(["a photo of an orange dahlia flower", "a map", "a head scan"]))}
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        want = {"img": student.encode_image(x["px"]), "txt": student.encode_text(x["ids"]),
                "files": torch.cat([student.encode_image(model_input(student, px)) for px in photos.chunks(8)])}
    code = f"""
import sys, torch, transformers
m = transformers.CLIPModel.from_pretrained({str(run / 'student-hf')!r}).eval()
tok = transformers.AutoTokenizer.from_pretrained({str(run / 'student-hf')!r})
x = torch.load({str(tmp_path / 'x.pt')!r})
proc = transformers.AutoImageProcessor.from_pretrained({str(run / 'student-hf')!r})
from PIL import Image
files = proc(images=[Image.open(p).convert("RGB") for p in x["files"]], return_tensors="pt")["pixel_values"]
with torch.no_grad():
    img, txt = m.get_image_features(pixel_values=x["px"]), m.get_text_features(input_ids=x["ids"])
    fimg = m.get_image_features(pixel_values=files.float())
img, txt, fimg = (getattr(t, "pooler_output", t) for t in (img, txt, fimg))
n = torch.nn.functional.normalize
torch.save({{"img": n(img, dim=-1), "txt": n(txt, dim=-1), "files": n(fimg, dim=-1), "ids": tok("a map")["input_ids"],
            "mcad": any(k.split('.')[0] == 'mcad' for k in sys.modules)}}, {str(tmp_path / 'y.pt')!r})
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    y = torch.load(tmp_path / "y.pt")
    assert y["mcad"] is False and y["ids"] == [int(i) for i in x["ids"][1][: len(y["ids"])]]
    torch.testing.assert_close(y["img"], want["img"], rtol=0, atol=1e-5)
    torch.testing.assert_close(y["txt"], want["txt"], rtol=0, atol=1e-5)
    assert y["files"].shape == want["files"].shape and float((y["files"] * want["files"]).sum(1).min()) >= 0.9999

    # export for this machine, bench, then index the photo folder and search it with a query
    mcad("mcad export target=cpu (onnx fp32)", ["export", "target=cpu", f"run={run}", "backends=onnx", "precision=fp32",
                                                "calib=8", "parity_images=4", "queries=2", "roles=text,image",
                                                "progress=0"], tmp_path, process=False)
    # the run's one captioned CSV serves calibration and parity alike: said, with the fix
    assert "one file serves every split, so the int8 calibration and the parity check" in caplog.text
    exp = json.loads((run / "export" / "cpu" / "manifest.json").read_text())
    assert {a["role"] for a in exp["artifacts"]} == {"text", "image"} and exp["image_size"] == CLIP_SIZE
    assert all(a.get("parity_pass", True) for a in exp["artifacts"])
    mcad("mcad bench device=local", ["bench", "device=local", f"run={run}", "quick=1", "galleries=200", "threads=1",
                                     "peers=none", "mobile=0", "image=0", "target=cpu", f"out={tmp_path / 'bench'}",
                                     "results=none"], tmp_path, process=False)
    bench = json.loads(next((tmp_path / "bench").glob("*.json")).read_text())
    assert bench["errors"] == [] and {r["subject"] for r in bench["rows"]} == {"student"}
    enc = run / "export" / "cpu"
    img_enc = next(enc / a["file"] for a in exp["artifacts"] if a["role"] == "image")
    txt_enc = next(enc / a["file"] for a in exp["artifacts"] if a["role"] == "text")
    mcad("mcad index", ["index", str(f["photos"]), f"out={tmp_path / 'index'}", f"encoder={img_enc}", "type=flat",
                        "progress=0"], tmp_path)
    found = json.loads(mcad("mcad search", ["search", f["first_query"], f"index={tmp_path / 'index'}",
                                            f"encoder={txt_enc}", "k=3", "--json"], tmp_path, capsys))
    assert found["count"] == f["n_photos"] and len(found["results"]) == 3
    assert all(Path(r["path"]).is_relative_to(f["photos"]) for r in found["results"])
    print("\nseconds:", json.dumps(COSTS))


def test_photo_folder_with_a_few_captions(files, tmp_path):
    """With a few captioned photos to train on: the pairs (contrastive labels + distillation) beside
    the photo folder and the queries (distillation only), one cache for both."""
    f = files
    common = ["data.format=csv", f"data.csv={{train: {f['held'] / 'train.csv'}, test: {f['held'] / 'test.csv'}}}",
              *teachers_and_unpaired(f, tmp_path)]
    mcad("mcad cache (with captions)", ["cache", *common], tmp_path)
    mcad("mcad student (with captions, 2 steps)", ["student", *common, "name=few", "steps=2", "batch_size=8",
                                                   "warmup=1", "ckpt_every=0", "adapters.steps=2"], tmp_path)
    m = json.loads((tmp_path / "few" / "metrics.json").read_text())
    assert m["teacher_outputs"].startswith("cache ") and m["unpaired"]["paired"] is True
    assert m["unpaired"]["teacher_outputs"].startswith("cache ")
    steps = [ln for ln in (tmp_path / "few" / "train.log").read_text().splitlines() if " step " in ln]
    assert len(steps) == 2 and all(" clip " in ln and " u_dist " in ln for ln in steps)  # labelled + unpaired terms
    assert (tmp_path / "few" / "student-hf" / "model.safetensors").exists()
    print("\nseconds:", json.dumps(COSTS))
