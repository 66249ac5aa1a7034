"""Nothing loaded unverified, nothing wrong said silently: resume checkpoints carry a sha256 checked
on resume; a loss that goes non-finite stops the run at its step; the bench verifies every artifact
against its export manifest and refuses an export whose parity failed; the tokenizer check compares
content; every PIL mode decodes by its meaning (against numpy references written here); a query the
tokenizer cannot represent says so. Each test failed on the code before the fix."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import fake_command, run_cli as cli
import torch
from PIL import Image


def _train(ckpt: Path, steps: int = 4, stop_at: int | None = None, nan_at: int | None = None, term: str = "dist"):
    """A small model trained with a checkpoint every step; with nan_at, the loss (and the logged
    `term`) go NaN at that 0-based step. Returns (trainer, model)."""
    from mcad.distill.trainer import Trainer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    cfg = {"steps": steps, "lr": 1e-2, "warmup": 1, "ckpt_every": 1}
    tr = Trainer({"m": model}, cfg, ckpt, desc="t", recipe=cfg)
    tr.resume()
    data = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))

    def loss_fn(step):
        clip = (model(data) ** 2).mean()
        dist = clip * float("nan") if step == nan_at else clip * 0.5
        logs = {"clip": float(clip.detach()), term: float(dist.detach())}
        return clip + dist, logs

    tr.fit(loss_fn, stop_at=stop_at, progress=False)
    return tr, model


def test_resume_checkpoint_with_flipped_bytes_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    from mcad.distill.trainer import DamagedCheckpoint

    ckpt = tmp_path / "student.ckpt.pt"
    _train(ckpt, stop_at=2)
    raw = bytearray(ckpt.read_bytes())
    for i in range(len(raw) // 2, len(raw) // 2 + 4):  # 4 bytes inside the payload, same size
        raw[i] ^= 0x5A
    ckpt.write_bytes(bytes(raw))
    with pytest.raises(DamagedCheckpoint, match=r"student.ckpt.pt: damaged training checkpoint \(content does not "
                                                r"match the sha256.*delete it to start over, or restore it"):
        _train(ckpt)
    fake_command(monkeypatch, lambda argv: _train(ckpt) and 0)
    code, err, _ = cli(["fake"], capsys)
    assert code == 1 and len(err) == 1 and str(ckpt) in err[0] and "resumed" not in err[0], err


def test_truncated_or_foreign_resume_checkpoint_is_the_same_one_line(tmp_path):
    from mcad.distill.trainer import DamagedCheckpoint

    ckpt = tmp_path / "dual.ckpt.pt"
    _train(ckpt, stop_at=2)
    whole = ckpt.read_bytes()
    for damaged in (whole[: len(whole) // 2], whole[:40], b"not a checkpoint"):
        ckpt.write_bytes(damaged)
        with pytest.raises(DamagedCheckpoint) as e:
            _train(ckpt)
        msg = str(e.value)
        assert msg.startswith(f"{ckpt}: damaged training checkpoint (") and "\n" not in msg, msg
        assert msg.endswith("delete it to start over, or restore it from a copy"), msg


def test_intact_and_pre_hash_checkpoints_resume_exactly(tmp_path):
    """The header costs nothing: resume is still bit-exact; a checkpoint written before the header
    (torch's own format) still resumes."""
    from mcad.distill.trainer import CKPT_MAGIC, verified_payload

    full, m_full = _train(tmp_path / "a" / "c.pt")
    _train(tmp_path / "b" / "c.pt", stop_at=2)
    raw = (tmp_path / "b" / "c.pt").read_bytes()
    assert raw.startswith(CKPT_MAGIC)
    tr, m_res = _train(tmp_path / "b" / "c.pt")
    assert tr.history[0]["step"] == 1 and all(torch.equal(a, b) for a, b in zip(m_full.state_dict().values(),
                                                                                m_res.state_dict().values()))
    legacy = tmp_path / "c" / "c.pt"
    legacy.parent.mkdir()
    legacy.write_bytes(bytes(verified_payload(tmp_path / "x", raw)))  # the bare torch payload
    tr, m_leg = _train(legacy)
    assert all(torch.equal(a, b) for a, b in zip(m_full.state_dict().values(), m_leg.state_dict().values()))


# -- non-finite losses ---------------------------------------------------------------------------------
def test_nan_loss_stops_at_its_step_naming_the_term_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    from mcad.distill.trainer import NonFiniteLoss

    ckpt = tmp_path / "student.ckpt.pt"
    _, before = _train(tmp_path / "ref.ckpt.pt", stop_at=2)  # the weights after two good steps
    with pytest.raises(NonFiniteLoss) as e:
        _train(ckpt, nan_at=2)
    msg = str(e.value)
    assert "\n" not in msg and "loss nan (term dist nan) at step 3 of 4" in msg, msg
    assert f"last checkpoint {ckpt} (step 2) is kept" in msg, msg
    tr, model = _train(ckpt, stop_at=2)  # the checkpoint is step 2's, finite, and resumes as it was
    assert tr.step == 2 and all(torch.equal(a, b) for a, b in zip(before.state_dict().values(),
                                                                  model.state_dict().values()))
    fake_command(monkeypatch, lambda argv: _train(tmp_path / "c2.pt", nan_at=0, term="feat") and 0)
    code, err, _ = cli(["fake"], capsys)
    assert code == 1 and len(err) == 1 and "term feat nan" in err[0] and "at step 1 of 4" in err[0], err


def test_non_finite_gradient_stops_the_run(tmp_path):
    from mcad.distill.trainer import NonFiniteLoss, Trainer

    p = torch.nn.Parameter(torch.ones(3))
    tr = Trainer({"m": torch.nn.ParameterList([p])}, {"steps": 3, "lr": 1e-2}, tmp_path / "c.pt", desc="t")
    with pytest.raises(NonFiniteLoss, match=r"t: gradient norm nan \(loss 0\) at step 1 of 3"):
        tr.fit(lambda step: (torch.sqrt(((p - p.detach()) ** 2).sum()), {}), progress=False)  # d sqrt at 0
    assert torch.equal(p.detach(), torch.ones(3))  # not applied


def test_non_finite_weights_are_never_saved(tmp_path):
    from mcad.distill.trainer import NonFiniteLoss, Trainer
    from mcad.models.checkpoint import CheckpointError, save_model
    from mcad.models.registry import create_model

    model = create_model("student-tiny")
    with torch.no_grad():
        next(p for p in model.parameters() if p.ndim == 2)[0].fill_(float("inf"))
    with pytest.raises(CheckpointError, match=r"s.safetensors: not written: weights hold NaN or inf"):
        save_model(model, tmp_path / "s.safetensors")
    tr = Trainer({"student": model}, {"steps": 1, "lr": 1e-3}, tmp_path / "s.ckpt.pt", desc="t")
    with pytest.raises(NonFiniteLoss, match="weights not finite"):
        tr.save()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.slow
def test_student_whose_kd_loss_overflows_stops_with_one_line_and_saves_no_model(teachers, synth_root, tmp_path, capsys):
    code, err, _ = cli(["student", f"data={synth_root}", f"teachers={teachers}", f"out={tmp_path}", "name=nan",
                        "variant=dual", "steps=3", "batch_size=16", "threads=1", "warmup=1", "loss.tau_kd=1e-300",
                        f"cache={tmp_path / 'no-cache'}"], capsys)
    assert code == 1 and len(err) == 1, err
    assert "loss nan" in err[0] and "dist nan" in err[0] and "at step 1 of 3" in err[0], err
    assert not (tmp_path / "nan" / "student.safetensors").exists()


# -- tokenizer content ------------------------------------------------------------------------------
def _swapped(tok, path: Path) -> Path:
    """The same tokenizer with two words' ids swapped: same size, same special ids, other ids."""
    data = json.loads(tok.to_json())
    vocab = data["model"]["vocab"]
    vocab["red"], vocab["blue"] = vocab["blue"], vocab["red"]
    path.write_text(json.dumps(data))
    return path


def test_tokenizer_of_the_same_size_but_other_ids_is_refused(tokenizer, synth_root, tmp_path, capsys):
    from mcad.models.checkpoint import CheckpointError, check_tokenizer, load_model, save_model
    from mcad.models.registry import create_model, with_tokenizer
    from mcad.runs import load_student
    from mcad.tokenizer import Tokenizer

    torch.manual_seed(0)
    model = create_model("student-tiny", **with_tokenizer({}, tokenizer)).eval()
    run = tmp_path / "run"
    run.mkdir()
    save_model(model, run / "student.safetensors", tokenizer=tokenizer)
    tokenizer.save(run / "tokenizer.json")
    other = Tokenizer.load(_swapped(tokenizer, tmp_path / "swapped.json"))
    assert other.vocab_size == tokenizer.vocab_size and other.eot_id == tokenizer.eot_id
    assert (other.encode("red") != tokenizer.encode("red")).any()
    load_student(run)  # its own tokenizer passes
    code, err, _ = cli(["eval", str(run / "student.safetensors"), f"tokenizer={tmp_path / 'swapped.json'}",
                        f"data={synth_root}"], capsys)
    assert code == 1 and len(err) == 1 and "swapped.json: tokenizer does not match" in err[0], err
    assert "other vocabulary or merges" in err[0], err
    shutil.copy(tmp_path / "swapped.json", run / "tokenizer.json")
    with pytest.raises(CheckpointError, match="other vocabulary or merges"):
        load_student(run)
    # saved again from the loaded model, the file keeps its tokenizer's hash
    again = save_model(load_model(run / "student.safetensors"), tmp_path / "again.safetensors")
    with pytest.raises(CheckpointError, match="other vocabulary or merges"):
        check_tokenizer(model.config, other, again, tmp_path / "swapped.json")
    # a checkpoint saved without its tokenizer (before the hash was recorded): sizes only, as before
    old = save_model(model, tmp_path / "old.safetensors")
    check_tokenizer(model.config, other, old, tmp_path / "swapped.json")


# -- image modes ------------------------------------------------------------------------------------
S = 8  # decoded at its own size: a square view of S px neither crops nor resizes


def _rng():
    return np.random.default_rng(7)


def _composite(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Straight alpha over white, rounded: the reference of every transparent mode."""
    a = alpha.astype(np.float64)[..., None] / 255.0
    return np.rint(rgb.astype(np.float64) * a + 255.0 * (1 - a)).astype(np.uint8)


def _grey(v: np.ndarray) -> np.ndarray:
    return np.repeat(v.astype(np.uint8)[..., None], 3, axis=2)


def _saved(im: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


def _case(mode: str):
    """(file bytes of a random S x S image of `mode`, its expected RGB [S, S, 3] by the numpy
    reference, tolerance in grey levels)."""
    r = _rng()
    rgb = r.integers(0, 256, (S, S, 3), dtype=np.uint8)
    alpha = r.integers(0, 256, (S, S), dtype=np.uint8)
    grey = r.integers(0, 256, (S, S), dtype=np.uint8)
    if mode == "1":
        bits = r.integers(0, 2, (S, S)).astype(bool)
        return _saved(Image.fromarray(bits), "PNG"), _grey(bits * 255), 0
    if mode == "L":
        return _saved(Image.fromarray(grey, "L"), "PNG"), _grey(grey), 0
    if mode == "LA":
        im = Image.fromarray(np.stack([grey, alpha], 2), "LA")
        return _saved(im, "PNG"), _composite(_grey(grey), alpha), 1
    if mode in ("P", "P+transparency"):
        pal = r.integers(0, 256, (256, 3), dtype=np.uint8)
        idx = r.integers(0, 16, (S, S), dtype=np.uint8)
        im = Image.fromarray(idx, "P")
        im.putpalette(pal.reshape(-1).tolist())
        want = pal[idx]
        if mode == "P":
            return _saved(im, "PNG"), want, 0
        want = np.where((idx == 3)[..., None], 255, want).astype(np.uint8)  # index 3 fully transparent
        return _saved(im, "PNG", transparency=3), want, 0
    if mode == "RGB":
        return _saved(Image.fromarray(rgb, "RGB"), "PNG"), rgb, 0
    if mode == "RGBA":
        return _saved(Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), "PNG"), _composite(rgb, alpha), 1
    if mode == "CMYK":
        cmyk = r.integers(0, 256, (S, S, 4), dtype=np.uint8)
        c, k = cmyk[..., :3].astype(np.float64), cmyk[..., 3:].astype(np.float64)
        want = np.rint((255 - c) * (255 - k) / 255).astype(np.uint8)
        return _saved(Image.fromarray(cmyk, "CMYK"), "TIFF"), want, 1
    if mode == "YCbCr":
        ycc = r.integers(0, 256, (S, S, 3), dtype=np.uint8)
        y, cb, cr = (ycc[..., i].astype(np.float64) for i in range(3))
        want = np.stack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
                         y + 1.772 * (cb - 128)], 2)  # JFIF (ITU-R BT.601, full range)
        return _saved(Image.fromarray(ycc, "YCbCr"), "TIFF"), np.clip(np.rint(want), 0, 255).astype(np.uint8), 1
    wide = r.integers(0, 65536, (S, S)).astype(np.int64)
    wide[0, 0], wide[0, 1] = 0, 65535  # the whole 16-bit range: black and white
    want16 = _grey(np.rint(wide / 257.0))
    if mode == "I;16":  # a 16-bit greyscale PNG
        return _saved(Image.fromarray(wide.astype("<u2")), "PNG"), want16, 0
    if mode == "I;16B":
        return _saved(Image.frombytes("I;16B", (S, S), wide.astype(">u2").tobytes()), "TIFF"), want16, 0
    if mode == "I":  # 32-bit integers holding a 16-bit image (a 16-bit PGM opens so)
        pgm = b"P5\n%d %d\n65535\n" % (S, S) + wide.astype(">u2").tobytes()
        return pgm, want16, 0
    if mode == "F":
        f = r.random((S, S), dtype=np.float32)
        f[0, 0], f[0, 1] = 0.0, 1.0
        return _saved(Image.fromarray(f, "F"), "TIFF"), _grey(np.rint(f.astype(np.float64) * 255)), 0
    raise AssertionError(mode)


MODES = ["1", "L", "LA", "P", "P+transparency", "RGB", "RGBA", "CMYK", "YCbCr", "I", "I;16", "I;16B", "F"]


@pytest.mark.parametrize("mode", MODES)
def test_every_image_mode_decodes_as_its_numpy_reference(mode):
    from mcad.data.images import decode_image

    data, want, tol = _case(mode)
    with Image.open(io.BytesIO(data)) as im:  # the file really is of that mode
        assert im.mode == mode.split("+")[0], im.mode
    got = decode_image(data, S).transpose(1, 2, 0)
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= tol, (mode, diff.max(), got[..., 0], want[..., 0])


def test_images_without_a_defined_8_bit_meaning_are_counted_bad(tmp_path):
    from mcad.data.csv_data import load_csv
    from mcad.data.images import UnsupportedImage, decode_image, load_images

    d = tmp_path / "img"
    d.mkdir()
    Image.new("RGB", (S, S), (10, 20, 30)).save(d / "ok.png")
    Image.fromarray(np.full((S, S), 3.5, np.float32), "F").save(d / "float.tiff")  # float outside 0..1
    Image.fromarray(np.full((S, S), 70000, np.int32), "I").save(d / "int.tiff")     # beyond 16 bits
    for name in ("float.tiff", "int.tiff"):
        with pytest.raises(UnsupportedImage, match="outside 0.."):
            decode_image(d / name, S)
    (tmp_path / "pairs.csv").write_text("filepath,caption\nimg/ok.png,fine\nimg/float.tiff,f\nimg/int.tiff,i\n")
    pixels, c = load_images(load_csv(tmp_path / "pairs.csv"), S, progress=False)
    assert len(pixels) == 1 and c.captions == ["fine"] and c.report.counts() == {"unreadable image": 2}


def test_sixteen_bit_png_in_a_data_set_is_not_white(tmp_path):
    """What the issue saw: a 16-bit greyscale PNG in a data set decoded to pure white."""
    from mcad.data.csv_data import load_csv
    from mcad.data.images import load_images

    (tmp_path / "img").mkdir()
    ramp = (np.arange(S * S).reshape(S, S) * (65535 // (S * S - 1))).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "img" / "g16.png")
    (tmp_path / "pairs.csv").write_text("filepath,caption\nimg/g16.png,a grey ramp\n")
    pixels, _ = load_images(load_csv(tmp_path / "pairs.csv"), S, progress=False)
    np.testing.assert_array_equal(pixels[0, 0], np.rint(ramp / 257.0).astype(np.uint8))


# -- queries the tokenizer cannot represent -------------------------------------------------------------
def test_query_notes_for_unknown_words_and_the_context_cut(tokenizer):
    assert tokenizer.unrepresented("a red circle left of a blue square") is None
    note = tokenizer.unrepresented("zzqx vvkk")
    assert note.startswith("no word of the query is known to the tokenizer ('zzqx', 'vvkk')"), note
    note = tokenizer.unrepresented("a red zzqx")
    assert note.startswith("1 of 3 words hold characters the tokenizer does not know ('zzqx')"), note
    long = " ".join(["red circle"] * 20)  # 40 tokens, context 24: the encoder reads 22
    ids = tokenizer.encode(long)
    assert ids[-1] == tokenizer.eot_id and (ids == tokenizer.eot_id).sum() == 1
    note = tokenizer.unrepresented(long)
    assert note.startswith("query cut at the context length (40 tokens, the encoder reads 22): 'red circle red"), note


def test_search_says_when_the_query_is_not_represented(tiny_run, synth_root, tmp_path, capsys):
    d = tmp_path / "photos"
    d.mkdir()
    for p in sorted((synth_root / "images").glob("test_*.png"))[:5]:
        shutil.copy(p, d / p.name)
    code, err, _ = cli(["index", str(d), f"out={tmp_path / 'idx'}", f"run={tiny_run}", "progress=false"], capsys)
    assert code == 0, err
    code, err, out = cli(["search", "zzqx vvkk", f"index={tmp_path / 'idx'}", "k=3"], capsys)
    assert code == 0 and len(out.strip().splitlines()) == 3  # the results, and beside them one line
    assert err == ["mcad search: note: no word of the query is known to the tokenizer ('zzqx', 'vvkk'): the results "
                   "do not reflect them"], err
    code, err, out = cli(["search", " ".join(["red circle"] * 20), f"index={tmp_path / 'idx'}", "--json"], capsys)
    assert code == 0 and json.loads(out)["note"].startswith("query cut at the context length") and len(err) == 1
    code, err, out = cli(["search", "a red circle", f"index={tmp_path / 'idx'}", "--json"], capsys)
    assert code == 0 and json.loads(out)["note"] is None and err == []


# -- the bench: verified artifacts, parity verdicts ---------------------------------------------------
def fake_export(run: Path, target: str = "cpu", files=("text_encoder.int8.onnx",), parity: dict | None = None,
                seed: int = 0) -> Path:
    """An export folder as mcad.export writes it (manifest last), whose programs are random bytes:
    what the bench checks before it opens or times anything."""
    from mcad.artifacts import Artifact, ExportManifest, Tensor
    from mcad.io import sha256_file, write_json

    out = run / "export" / target
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    runtime = {".onnx": "onnxruntime", ".tflite": "litert", ".pte": "executorch"}
    arts = []
    for f in files:
        (out / f).write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
        rec = (parity or {}).get("artifacts", {}).get(f, {})
        arts.append(Artifact(name="text_encoder", role="text", runtime=runtime[Path(f).suffix], backend="x", file=f,
                             bytes=4096, sha256=sha256_file(out / f), quantization="int8",
                             inputs=[Tensor("ids", [1, 24], "int64")], outputs=[Tensor("emb", [1, 64], "float32")],
                             parity_pass=rec.get("pass")))
    m = ExportManifest(target=target, run=str(run), model="student-tiny", embed_dim=64, context_length=24,
                       image_size=0, image_mean=[], image_std=[], artifacts=arts, parity=parity)
    write_json(out / "manifest.json", m.to_json())
    return out


@pytest.fixture
def bench_run(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    return run


def _no_timing(monkeypatch) -> list:
    """Record every job the local device is asked to time (none may be, for a refused export)."""
    from mcad.device.local import LocalDevice

    timed = []
    monkeypatch.setattr(LocalDevice, "run", lambda self, job: timed.append(job) or {})
    return timed


def _bench(run, capsys, *extra):
    return cli(["bench", f"run={run}", "quick=1", "runtimes=onnxruntime", "peers=none", "mobile=0", "image=0",
                "results=none", *extra], capsys)


def test_bench_refuses_a_damaged_artifact_before_timing_with_the_rebuild_command(bench_run, monkeypatch, capsys):
    out = fake_export(bench_run)
    f = out / "text_encoder.int8.onnx"
    raw = bytearray(f.read_bytes())
    raw[100] ^= 0x01
    f.write_bytes(bytes(raw))
    timed = _no_timing(monkeypatch)
    code, err, _ = _bench(bench_run, capsys)
    assert code == 1 and len(err) == 1 and not timed, err
    assert f"{f}: sha256 differs from {out / 'manifest.json'}" in err[0], err
    assert f"rebuild: `make export TARGET=cpu RUN={bench_run}`" in err[0], err
    f.unlink()
    code, err, _ = _bench(bench_run, capsys)
    assert code == 1 and len(err) == 1 and not timed and f"{f}: artifact listed in" in err[0] and "is missing" in err[0]


def test_bench_refuses_an_export_folder_without_its_manifest(bench_run, monkeypatch, capsys):
    """A re-export killed before it wrote its manifest leaves programs and no manifest: refused, not
    skipped for a bench-made stand-in or another target."""
    out = fake_export(bench_run, files=("text_encoder.xnnpack.int8.pte",))
    fake_export(bench_run, target="snapdragon", seed=1)
    (out / "manifest.json").unlink()
    timed = _no_timing(monkeypatch)
    code, err, _ = _bench(bench_run, capsys)
    assert code == 1 and len(err) == 1 and not timed, err
    assert f"{out}: holds text_encoder.xnnpack.int8.pte but no manifest.json" in err[0], err
    assert f"rebuild: `make export TARGET=cpu RUN={bench_run}`" in err[0], err


def test_search_and_the_bench_share_one_verification(bench_run, tmp_path):
    from mcad.artifacts import ManifestError, load_manifest
    from mcad.benchmarks.subjects import student_subject
    from mcad.search.common import SearchError
    from mcad.search.encoders import ArtifactEncoder

    out = fake_export(bench_run)
    f = out / "text_encoder.int8.onnx"
    f.write_bytes(f.read_bytes()[:-1] + b"\0")
    with pytest.raises(ManifestError) as bench:
        student_subject(bench_run, tmp_path, ["onnxruntime"], None, ["a red circle"])
    with pytest.raises(SearchError) as search:
        ArtifactEncoder(f, "text")
    with pytest.raises(ManifestError) as manifest:
        load_manifest(out, verify=True)
    assert str(bench.value) == str(search.value) == str(manifest.value)


FAILED = {"pass": False, "artifacts": {"text_encoder.int8.onnx": {"role": "text", "pass": False},
                                       "text_encoder.int8.tflite": {"role": "text", "pass": True}}}


@pytest.mark.parametrize("parity", [FAILED, {"pass": False, "artifacts": {}}], ids=["per-artifact", "overall"])
def test_bench_refuses_an_export_whose_parity_failed(bench_run, monkeypatch, capsys, parity):
    fake_export(bench_run, files=("text_encoder.int8.onnx", "text_encoder.int8.tflite"), parity=parity)
    timed = _no_timing(monkeypatch)
    code, err, _ = _bench(bench_run, capsys)
    assert code == 1 and len(err) == 1 and not timed, err
    failed = "text_encoder.int8.onnx" if parity["artifacts"] else "text_encoder.int8.onnx, text_encoder.int8.tflite"
    assert f"parity failed for {failed} (" in err[0] and "allow_failed_parity=1" in err[0], err
    code, err, _ = _bench(bench_run, capsys, "budget=gate", "allow_failed_parity=1")  # the gate: never
    assert code == 1 and len(err) == 1 and not timed, err
    assert "the gate never passes an export whose parity failed" in err[0], err


def test_parity_verdicts_of_a_manifest():
    from mcad.artifacts import ExportManifest

    def m(parity, flags=(None, None)):
        arts = [{"name": "text_encoder", "role": "text", "runtime": "onnxruntime", "backend": "onnx", "file": f,
                 "bytes": 1, "sha256": "0", "quantization": "int8", "inputs": [], "outputs": [],
                 **({} if p is None else {"parity_pass": p})} for f, p in zip(("a.onnx", "b.onnx"), flags)]
        return ExportManifest.from_json({"version": 2, "target": "cpu", "embed_dim": 4, "context_length": 4,
                                         "image_size": 0, "artifacts": arts, "parity": parity})

    from mcad.artifacts import parity_failures

    assert parity_failures(m(None)) == [] and parity_failures(m({"pass": True, "artifacts": {}})) == []
    assert parity_failures(m({"pass": False, "artifacts": {}})) == ["a.onnx", "b.onnx"]
    assert parity_failures(m({"pass": False, "artifacts": {"b.onnx": {"pass": False}}})) == ["b.onnx"]
    assert parity_failures(m({"pass": False, "artifacts": {}}, (True, False))) == ["b.onnx"]


@pytest.fixture(scope="module")
def real_export(tmp_path_factory, tokenizer, synth_root):
    """A run with a real fp32 ONNX export (text encoder and search program), parity not run."""
    from conftest import make_run
    from mcad.export.pipeline import Options, export

    run = make_run(tmp_path_factory.mktemp("exp") / "run", tokenizer)
    export(Options(run=run, data=synth_root, target="cpu", backends=("onnx",), roles=("text", "search"),
                   precision="fp32", parity=False, calib=4, progress=False))
    return run


PERMISSIVE = "devices:\n  local: {match: [local], budgets: {student: {1000: {p50_ms: 10000, memory_mb: 10000}}}}\n" \
             "  gate: {match: [], budgets: {student: {1000: {p50_ms: 10000, memory_mb: 10000}}}}\n"


@pytest.mark.slow
def test_bench_with_allow_failed_parity_marks_every_failed_row_and_bench_md(real_export, tmp_path, capsys):
    from mcad.io import read_json, write_json

    run = tmp_path / "run"
    shutil.copytree(real_export, run)
    mpath = run / "export" / "cpu" / "manifest.json"
    m = read_json(mpath)
    bad = next(a["file"] for a in m["artifacts"] if a["role"] == "text")
    m["parity"] = {"pass": False, "artifacts": {a["file"]: {"role": a["role"], "pass": a["file"] != bad}
                                                for a in m["artifacts"]}}
    write_json(mpath, m)  # only the manifest changes: the files still verify
    (tmp_path / "b.yaml").write_text(PERMISSIVE)
    common = ["galleries=1000", "threads=1", "runs=3", "warmup=1", f"budgets={tmp_path / 'b.yaml'}"]
    code, err, _ = _bench(run, capsys, *common, f"out={tmp_path / 'refused'}")
    assert code == 1 and len(err) == 1 and f"parity failed for {bad} (" in err[0], err
    assert not (tmp_path / "refused" / "bench.json").exists()
    code, err, out = _bench(run, capsys, *common, f"out={tmp_path / 'o'}", "allow_failed_parity=1")
    assert code == 0, (err, out)
    res = json.loads((tmp_path / "o" / "bench.json").read_text())
    rows = [r for r in res["rows"] if r["subject"] == "student"]
    assert res["parity_failed"] == [bad] and rows
    assert all((r.get("parity") == "PARITY FAILED") == (r["file"] == bad) for r in rows)
    assert any(r["file"] == bad for r in rows) and any(r["file"] != bad for r in rows)
    md = (tmp_path / "o" / "bench.md").read_text()
    assert md.splitlines()[0].endswith(f"(PARITY FAILED: {bad}) on local"), md.splitlines()[0]
    marked = [ln for ln in md.splitlines() if ln.startswith("| student (PARITY FAILED) |")]
    assert len(marked) == sum(r["file"] == bad for r in rows) and all(bad in ln for ln in marked)
    lines = out.strip().splitlines()
    assert lines[-1].startswith(f"bench: PARITY FAILED for {bad}") and any("student PARITY FAILED" in ln for ln in lines)
    code, err, _ = _bench(run, capsys, *common, f"out={tmp_path / 'g'}", "budget=gate", "allow_failed_parity=1")
    assert code == 1 and len(err) == 1 and "the gate never passes" in err[0], err
