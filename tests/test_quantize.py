"""mcad.quantize: calibration sets, PT2E int8 (XNNPACK, QNN, LiteRT quantizers), ONNX Runtime QDQ
and full-integer TFLite, each checked against the eager fp32 encoder (cosine)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_run

STUDENTS = ["student-tiny", "student-tiny-vit"]


def _students():
    from mcad.models.registry import list_models

    return [n for n in list_models("dual") if n.startswith("student-")]


def test_registered_students_are_covered():
    # every student config is exercised here or (student-mobile, 49k vocab) by the fp32 export test
    assert set(_students()) <= set(STUDENTS) | {"student-mobile"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer):
    from mcad.runs import load_student

    out = {}
    for name in STUDENTS:
        path = make_run(tmp_path_factory.mktemp("q") / name, tokenizer, name)
        out[name] = load_student(path)[0]
    return out


@pytest.fixture(scope="module")
def samples(runs, tokenizer, synth_root):
    from mcad.quantize.calib import load_samples

    model = runs["student-tiny"]
    return {"calib": load_samples(model, tokenizer, synth_root, n=24, split="train"),
            "test": load_samples(model, tokenizer, synth_root, n=24, split="test", captions_per_image=1)}


def _cos(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_parse_keep():
    from mcad.quantize.pt2e import DEFAULT_KEEP_FP32, parse_keep

    assert parse_keep(None, "xnnpack") == DEFAULT_KEEP_FP32["xnnpack"]
    assert parse_keep(None, "qnn") == DEFAULT_KEEP_FP32["qnn"]
    assert parse_keep("proj, softmax") == ("proj", "softmax")
    assert parse_keep("none") == () and parse_keep([]) == ()
    assert parse_keep(["tower.blocks.0"]) == ("tower.blocks.0",)
    with pytest.raises(ValueError, match="keep_fp32: unknown entry 'bogus'"):
        parse_keep("bogus")


def test_calibration_samples(runs, tokenizer, synth_root):
    from mcad.quantize.calib import load_samples

    model = runs["student-tiny"]
    a = load_samples(model, tokenizer, synth_root, n=16, split="train", seed=3)
    b = load_samples(model, tokenizer, synth_root, n=16, split="train", seed=3)
    assert a.pixels.shape == (16, 3, model.image_size, model.image_size) and a.pixels.dtype == np.float32
    assert a.ids.shape == (16, model.context_length) and a.ids.dtype == np.int64
    np.testing.assert_array_equal(a.ids, b.ids)  # seeded draw
    assert -1.01 <= a.pixels.min() and a.pixels.max() <= 1.01  # normalised with the model's mean/std
    allcaps = load_samples(model, tokenizer, synth_root, n=4, split="test", captions_per_image=0)
    assert len(allcaps.ids) == 20 and allcaps.caption_to_image.tolist() == sorted(allcaps.caption_to_image.tolist())
    with pytest.raises(FileNotFoundError, match="no such data set"):
        load_samples(model, tokenizer, synth_root / "missing.json")


def test_calibration_samples_from_any_data_format(runs, tokenizer, synth_root, tmp_path):
    """A user's CSV (by path, or as the `data:` spec a run records) gives the same samples as the
    Karpathy file holding the same pairs: export calibrates a run on the data it was trained on."""
    from mcad.data.images import load_images, normalize
    from mcad.data.karpathy import load_karpathy
    from mcad.quantize.calib import load_samples

    model = runs["student-tiny"]
    corpus = load_karpathy(synth_root / "dataset_synth.json", split="train").subset(12)
    (tmp_path / "img").mkdir()
    for p in corpus.image_paths:  # a user's folder: the images beside the CSV that names them
        shutil.copy(p, tmp_path / "img" / Path(p).name)
    rows = ["filepath,caption"] + [f"img/{Path(corpus.image_paths[i]).name},{corpus.captions[c]}"
                                   for c, i in enumerate(corpus.caption_to_image.tolist())]
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    by_path = load_samples(model, tokenizer, tmp_path / "pairs.csv", n=5, split="train", seed=1, captions_per_image=0)
    by_spec = load_samples(model, tokenizer, {"format": "csv", "csv": str(tmp_path / "pairs.csv"), "root": None},
                           n=5, split="train", seed=1, captions_per_image=0)
    np.testing.assert_array_equal(by_path.pixels, by_spec.pixels)
    np.testing.assert_array_equal(by_path.ids, by_spec.ids)
    assert len(by_path) == 5 and by_path.source == f"data.format=csv data.csv={tmp_path / 'pairs.csv'}:train"
    # all of it: the Karpathy rows' images, decoded and normalised as the model sees them, and their captions
    full = load_samples(model, tokenizer, tmp_path / "pairs.csv", n=0, split="train", captions_per_image=0)
    pixels_u8, _ = load_images(corpus, model.image_size, progress=False)
    np.testing.assert_array_equal(full.pixels, normalize(pixels_u8, model.image_mean, model.image_std).numpy())
    np.testing.assert_array_equal(full.ids, tokenizer.encode_batch(corpus.captions))
    np.testing.assert_array_equal(full.caption_to_image, corpus.caption_to_image)


@pytest.mark.parametrize("backend", ["xnnpack", "qnn", "litert"])
@pytest.mark.parametrize("student", STUDENTS)
def test_pt2e_int8_matches_fp32(backend, student, runs, samples, tokenizer, synth_root, monkeypatch, tmp_path):
    """Prepare/convert with each PT2E quantizer (QNN's runs without the SDK) and compare the
    quantized eager graph with the fp32 encoder on held-out inputs."""
    from mcad.quantize.calib import load_samples
    from mcad.quantize.pt2e import Normalized, quantize_core

    if backend == "qnn":
        empty = tmp_path / "qnn-sdk"
        empty.mkdir()
        monkeypatch.setenv("QNN_SDK_ROOT", str(empty))
    model = runs[student]
    calib = load_samples(model, tokenizer, synth_root, n=16, split="train")
    test = samples["test"]
    for role, x, xt in (("text", calib.ids, test.ids), ("image", calib.pixels, test.pixels)):
        enc = model.text_encoder() if role == "text" else model.image_encoder()
        q, _ = quantize_core(enc, x, backend)
        xt = torch.as_tensor(xt)
        with torch.no_grad():
            got = torch.cat([Normalized(q)(xt[i:i + 1]) for i in range(len(xt))]).numpy()
            ref = enc(xt).numpy()
        c = _cos(got, ref)
        assert c.mean() >= 0.99 and c.min() >= 0.97, (backend, student, role, c.mean(), c.min())
        # int8 for real: the converted graph carries quantize/dequantize ops
        targets = {str(n.target) for n in q.graph.nodes if n.op == "call_function"}
        assert any("quantize_per" in t for t in targets), targets


def test_keep_fp32_leaves_modules_float(runs, samples):
    from mcad.quantize.pt2e import quantize_core

    enc = runs["student-tiny"].text_encoder()
    q_all, _ = quantize_core(enc, samples["calib"].ids, "xnnpack", keep_fp32=[])
    q_proj, _ = quantize_core(enc, samples["calib"].ids, "xnnpack", keep_fp32=["proj"])

    def proj_weight_quantized(gm):
        for n in gm.graph.nodes:
            if n.op == "call_function" and "linear" in str(n.target):
                stack = list((n.meta.get("nn_module_stack") or {}).values())
                if stack and stack[-1][0] == "proj":
                    w = n.args[1]
                    return w.op == "call_function" and "dequantize" in str(w.target)
        raise AssertionError("no proj linear in the graph")

    assert proj_weight_quantized(q_all)
    assert not proj_weight_quantized(q_proj)


def test_onnx_qdq_int8(runs, samples, tmp_path):
    import onnx

    from mcad.export.builders import build_onnx
    from mcad.export.programs import example_inputs, program
    from mcad.quantize.onnx_quant import quantize_onnx
    from mcad.runtimes import run_artifact
    from mcad.quantize.pt2e import Core

    model = runs["student-tiny"]
    for role, name, x, xt in (("text", "ids", samples["calib"].ids, samples["test"].ids),
                              ("image", "pixels", samples["calib"].pixels, samples["test"].pixels)):
        enc = model.text_encoder() if role == "text" else model.image_encoder()
        fp, q8 = tmp_path / f"{role}.onnx", tmp_path / f"{role}.int8.onnx"
        build_onnx(program(role, Core(enc), Core(enc)), example_inputs(model, role), fp, [name], ["emb"])
        quantize_onnx(fp, q8, {name: x})
        ops = {n.op_type for n in onnx.load(str(q8)).graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
        got, meta = run_artifact(q8, [[xt[i:i + 1]] for i in range(len(xt))])
        ref = enc(torch.as_tensor(xt)).detach().numpy()
        c = _cos(np.concatenate([g[0] for g in got]), ref)
        assert c.mean() >= 0.99 and c.min() >= 0.97, (role, c.mean(), c.min())
        assert meta["inputs"][0]["name"] == name


def test_full_integer_tflite(runs, samples, tmp_path):
    from mcad.export.builders import build_tflite
    from mcad.export.programs import example_inputs, program
    from mcad.quantize.pt2e import Core
    from mcad.quantize.tflite_quant import full_integer
    from mcad.runtimes import litert_interpreter, run_artifact

    model = runs["student-tiny"]
    enc = model.image_encoder()
    fp, q8 = tmp_path / "image.tflite", tmp_path / "image.full_int8.tflite"
    build_tflite(program("image", None, Core(enc)), example_inputs(model, "image"), fp, ["pixels"])
    full_integer(fp, q8, {"pixels": samples["calib"].pixels})
    it = litert_interpreter(q8)
    assert it.get_input_details()[0]["dtype"] == np.int8  # full integer: int8 model I/O
    assert it.get_output_details()[0]["dtype"] == np.int8
    xt = samples["test"].pixels
    got, meta = run_artifact(q8, [[xt[i:i + 1]] for i in range(len(xt))], names=["pixels"])
    ref = enc(torch.as_tensor(xt)).detach().numpy()
    c = _cos(np.concatenate([g[0] for g in got]), ref)
    assert c.mean() >= 0.99 and c.min() >= 0.97, (c.mean(), c.min())
    assert meta["inputs"][0]["quantization"]["scale"] > 0


def test_onnx_percentile_falls_back_to_minmax_on_a_near_constant_tensor(tmp_path, caplog):
    """ORT's histogram calibrators cannot bin a tensor spanning fewer than 2048 float32 steps (seen
    on a two-step student of the real-data fixture); the export keeps going with MinMax ranges and
    says so, instead of dropping the ONNX artifact."""
    import onnx

    from mcad.export.builders import build_onnx
    from mcad.quantize.onnx_quant import quantize_onnx
    from mcad.runtimes import run_artifact

    class NearConstant(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)

        def forward(self, x):
            return self.b(self.a(x) * 1e-7 + 1.0)  # the hidden tensor: 1.0 +- a few float32 steps

    class Program(torch.nn.Module):  # nodes outside `core` stay float (onnx_quant.float_nodes)
        def __init__(self):
            super().__init__()
            self.core = NearConstant()

        def forward(self, x):
            return self.core(x)

    torch.manual_seed(0)
    m, x = Program().eval(), torch.randn(16, 8)
    fp, q8 = tmp_path / "m.onnx", tmp_path / "m.int8.onnx"
    build_onnx(m, (x[:1],), fp, ["x"], ["y"])
    got = quantize_onnx(fp, q8, {"x": x.numpy()}, method="percentile")
    assert got["method"] == "minmax" and "percentile calibration failed" in got["fallback"]
    assert "MinMax ranges used" in caplog.text
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in onnx.load(str(q8)).graph.node}
    out, _ = run_artifact(q8, [[x[i:i + 1].numpy()] for i in range(4)])
    np.testing.assert_allclose(np.concatenate([o[0] for o in out]), m(x[:4]).detach().numpy(), atol=0.05)
    assert quantize_onnx(fp, tmp_path / "mm.onnx", {"x": x.numpy()})["fallback"] is None  # minmax: no fallback


def test_qnn_image_encoder_is_a16w8(runs, samples, tokenizer, synth_root, monkeypatch, tmp_path):
    """The QNN image encoder's activations are 16-bit (HTP runs A16W8): the converted graph quantizes
    to 16 bits (weights stay int8), and it is at least as close to fp32 as the A8W8 one on held-out images."""
    from mcad.quantize.calib import load_samples
    from mcad.quantize.pt2e import Normalized, quantize_core

    empty = tmp_path / "qnn-sdk"
    empty.mkdir()
    monkeypatch.setenv("QNN_SDK_ROOT", str(empty))
    model = runs[STUDENTS[0]]
    calib = load_samples(model, tokenizer, synth_root, n=16, split="train").pixels
    xt = torch.as_tensor(samples["test"].pixels)
    enc = model.image_encoder()
    with torch.no_grad():
        ref = enc(xt).numpy()
    cos = {}
    for backend in ("qnn", "qnn16"):
        q, _ = quantize_core(enc, calib, backend)
        dtypes = {a for n in q.graph.nodes if n.op == "call_function" and "quantize_per" in str(n.target)
                  for a in n.args if isinstance(a, torch.dtype)}
        sixteen = bool({torch.int16, torch.uint16} & dtypes)
        assert sixteen == (backend == "qnn16") and torch.int8 in dtypes, (backend, dtypes)
        with torch.no_grad():
            cos[backend] = _cos(torch.cat([Normalized(q)(xt[i:i + 1]) for i in range(len(xt))]).numpy(), ref)
    summary = {k: (v.mean(), v.min()) for k, v in cos.items()}
    assert cos["qnn16"].mean() >= cos["qnn"].mean() and cos["qnn16"].min() >= 0.97, summary
