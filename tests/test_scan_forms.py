"""The search-program scan benchmark: every runtime's program returns the exact top-10 (checked
inside, before timing), and its figures land in JSON and markdown."""
from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_scan_forms_exact_and_written(tmp_path):
    import scan_forms

    assert scan_forms.main(["rows=300", "dims=8", "runs=3", f"results={tmp_path}"]) == 0
    res = json.loads((tmp_path / "scan_forms.json").read_text())
    (m,) = res["by_dim"]
    assert m["dim"] == 8 and m["rows"] == 300 and m["faiss_flat_ms"] < 10_000
    assert set(m["programs"]) == {"executorch", "litert", "onnxruntime"}
    for p in m["programs"].values():  # each program against the flat scan timed in the same run
        assert p["x_faiss"] == pytest.approx(p["p50_ms"] / m["faiss_flat_ms"], rel=0.1, abs=0.011)  # both rounded to 3 places
    assert set(m["bound"]) == {"executorch-int8", "executorch-fp32", "litert-fp32"}
    assert m["bound"]["executorch-fp32"]["recall_at_k"] == m["bound"]["litert-fp32"]["recall_at_k"] == 1.0
    assert m["bound"]["executorch-int8"]["recall_at_k"] >= 0.7  # int8 rows, int8 query, 8 dims
    assert "| 8 |" in (tmp_path / "scan_forms.md").read_text()


def test_a_wrong_top_k_is_caught(tmp_path, monkeypatch):
    import scan_forms

    real = scan_forms.build

    def off_by_one(runtime, dim, k, folder):
        call = real(runtime, dim, k, folder)
        return (lambda q, g: (call(q, g).reshape(-1) + 1)) if runtime == "litert" else call
    monkeypatch.setattr(scan_forms, "build", off_by_one)
    with pytest.raises(AssertionError, match="litert top-10 at N=300, D=8 differs from the exact scan"):
        scan_forms.measure(300, 8, 3, 10, tmp_path)
