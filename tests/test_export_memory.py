"""Export memory: ONNX Runtime's histogram calibration, streamed (quantize.calib.streamed_collect),
gives ORT's own ranges and int8 files byte for byte while holding one sample's activations at a
time, where ORT's one pass holds every calibrated tensor of every sample (GBs at 224 px)."""
from __future__ import annotations

import hashlib
import tracemalloc

import numpy as np
import pytest
import torch

N, WIDTH = 96, 4096  # samples; width of the hidden activations (16 KB each, three calibrated per sample)


class Core(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(16, WIDTH), torch.nn.Linear(WIDTH, WIDTH // 8)
        self.c = torch.nn.Linear(WIDTH // 8, 8)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)) * 1.5)))


class Program(torch.nn.Module):  # onnx_quant quantizes what is under `core`
    def __init__(self):
        super().__init__()
        self.core = Core()

    def forward(self, x):
        return self.core(x)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from mcad.export.builders import build_onnx

    torch.manual_seed(0)
    fp = tmp_path_factory.mktemp("mem") / "m.onnx"
    # heavy-tailed inputs: percentile ranges differ from MinMax ones
    x = (torch.randn(N, 16) * torch.rand(N, 1) ** 3 * 4).numpy()
    build_onnx(Program().eval(), (torch.as_tensor(x[:1]),), fp, ["x"], ["y"])
    return fp, x


class Reader:
    def __init__(self, x):
        self.x, self.i = x, 0

    def get_next(self):
        if self.i >= len(self.x):
            return None
        self.i += 1
        return {"x": self.x[self.i - 1:self.i]}

    def rewind(self):
        self.i = 0


def _calibrator(fp, tmp_path, method):
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    m = {"percentile": CalibrationMethod.Percentile, "entropy": CalibrationMethod.Entropy}[method]
    return create_calibrator(fp, ["MatMul", "Gemm", "Add", "Mul", "Relu"],
                             augmented_model_path=str(tmp_path / f"aug-{method}.onnx"), calibrate_method=m)


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_streamed_ranges_are_orts_and_hold_one_sample(model, tmp_path, method):
    from mcad.quantize.calib import streamed_collect

    fp, x = model
    ranges, peaks = {}, {}
    for how in ("ort", "streamed"):
        cal = _calibrator(fp, tmp_path, method)
        tracemalloc.start()
        if how == "ort":
            cal.collect_data(Reader(x))
        else:
            streamed_collect(cal, Reader(x))
        peaks[how] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        ranges[how] = {k: {a: np.asarray(v) for a, v in t.to_dict().items() if a != "CLS"}
                       for k, t in cal.compute_data().data.items()}
    assert len(ranges["ort"]) >= 5 and ranges["ort"].keys() == ranges["streamed"].keys()
    for k, ref in ranges["ort"].items():
        got = ranges["streamed"][k]
        assert ref.keys() == got.keys() and "hist" in ref, (k, ref, got)
        assert all(np.array_equal(ref[a], got[a]) and ref[a].dtype == got[a].dtype for a in ref), (k, ref, got)
    act = WIDTH * 4  # bytes of one wide activation
    assert peaks["ort"] > N * 2 * act, peaks  # ORT's one pass: every sample's activations at once
    # streamed: one sample's activations and the histograms (2048 bins per tensor for percentile)
    assert peaks["streamed"] < N * act / 2 and peaks["streamed"] < peaks["ort"] / 5, peaks


def _count_streamed(monkeypatch) -> list:
    """The calls that reach quantize.calib.streamed_collect (so a test sees the streamed path taken)."""
    from mcad.quantize import calib

    calls, real = [], calib.streamed_collect

    def counted(cal, reader):
        calls.append(cal.method)
        return real(cal, reader)

    monkeypatch.setattr(calib, "streamed_collect", counted)
    return calls


def test_quantize_onnx_streamed_writes_the_same_file(model, tmp_path, monkeypatch):
    from mcad.quantize.calib import streamed_onnx_calibration
    from mcad.quantize.onnx_quant import quantize_onnx

    fp, x = model
    ref, got = tmp_path / "ref.onnx", tmp_path / "got.onnx"
    used = quantize_onnx(fp, ref, {"x": x}, method="percentile")
    calls = _count_streamed(monkeypatch)
    with streamed_onnx_calibration():
        assert quantize_onnx(fp, got, {"x": x}, method="percentile") == used
    assert calls == ["percentile"]
    assert hashlib.sha256(got.read_bytes()).hexdigest() == hashlib.sha256(ref.read_bytes()).hexdigest()
    import importlib

    from onnxruntime.quantization.calibrate import create_calibrator

    ort_quantize = importlib.import_module("onnxruntime.quantization.quantize")
    assert ort_quantize.create_calibrator is create_calibrator  # ORT's own again once closed


def test_streamed_near_constant_tensor_falls_back_as_ort_does(tmp_path, monkeypatch):
    """A tensor spanning fewer float32 steps than the bin count: ORT's binning refuses it, and the
    streamed pass refuses it the same way, so quantize_onnx's MinMax fallback is taken as before."""
    from mcad.export.builders import build_onnx
    from mcad.quantize.calib import streamed_onnx_calibration
    from mcad.quantize.onnx_quant import quantize_onnx

    class NearConstant(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.core = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.core(x) * 1e-7 + 1.0

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.core = NearConstant()
            self.head = torch.nn.Linear(8, 4)

        def forward(self, x):
            return self.head(self.core(x))

    torch.manual_seed(0)
    m, x = Wrap().eval(), torch.randn(8, 8)
    fp = tmp_path / "m.onnx"
    build_onnx(m, (x[:1],), fp, ["x"], ["y"])
    ref = quantize_onnx(fp, tmp_path / "ref.onnx", {"x": x.numpy()}, method="percentile")
    calls = _count_streamed(monkeypatch)
    with streamed_onnx_calibration():
        got = quantize_onnx(fp, tmp_path / "got.onnx", {"x": x.numpy()}, method="percentile")
    assert calls == ["percentile"] and got == ref and got["method"] == "minmax"
    assert (tmp_path / "got.onnx").read_bytes() == (tmp_path / "ref.onnx").read_bytes()
