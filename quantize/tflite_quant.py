"""Full-integer TFLite (for NPU delegates: MediaTek NeuroPilot, QNN HTP, NNAPI) with
`ai_edge_quantizer`'s static recipes: every supported op integer, weights per-channel symmetric
int8, activations calibrated with plain min/max in 16 bits (static_wi8_ai16, A16W8: what
NeuroPilot and HTP run; 8-bit activations cost the default student 1.2 R@1) or 8 bits
(static_wi8_ai8, A8W8, for NPUs that take only int8); the float model input (pixels) becomes an
integer input of the activations' width; token ids int32.

`keep_fp32` aliases map to tensor-name regexes (litert_torch names tensors after the module
path, `.../torch.nn.modules.linear.Linear_proj`) or op types; `float_regex` keeps more float
(the export keeps the program wrapper's own ops float: L2 normalisation, gallery matmul, top-k,
so embeddings leave as float32)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from mcad.quantize.pt2e import KEEP_ALIASES, parse_keep

log = logging.getLogger("mcad.quantize")

TFL_OPS = {"softmax": "SOFTMAX", "_softmax": "SOFTMAX", "add": "ADD", "mul": "MUL", "matmul": "BATCH_MATMUL",
           "bmm": "BATCH_MATMUL", "mm": "FULLY_CONNECTED", "transpose": "TRANSPOSE", "permute": "TRANSPOSE",
           "view": "RESHAPE", "reshape": "RESHAPE", "_unsafe_view": "RESHAPE"}


def _keep_rules(keep: Sequence[str]) -> list[tuple[str, str]]:
    """(regex, TFLite op name or '*') pairs to leave unquantized."""
    rules = []
    for k in keep:
        spec = KEEP_ALIASES.get(k, {"modules": (k,)})
        for m in spec.get("modules", ()):
            if m.endswith(".*"):
                continue
            # module path a.b.0 -> name fragments "_a/" ... "_b/" ... "_0"
            parts = m.split(".")
            rules.append((".*".join(f"_{p}(/|;|$)" for p in parts), "*"))
        for t in spec.get("types", ()):
            rules.append((f"\\.{t}_", "*"))
        for o in spec.get("ops", ()):
            rules.append((".*", TFL_OPS.get(o, o.upper())))
        for t, ops in spec.get("ops_in", {}).items():
            # ops directly inside a module of type t: "<...>.Attention_attn;5" (not ".../Linear_q")
            for op in sorted({TFL_OPS[o] for o in ops if o in TFL_OPS}):
                rules.append((f"\\.{t}_\\w+(;|$)", op))
    return sorted(set(rules))


def _calibrate(qt, data: dict):
    """Calibrate with plain min/max over all samples. Quantizer.calibrate uses a moving average
    of per-sample min/max, which with batch-1 samples clips the extremes (image min cosine 0.90
    instead of 0.98 on a trained student-tiny)."""
    try:
        from ai_edge_quantizer import calibrator
        from ai_edge_quantizer.utils import qsv_utils

        cal = calibrator.Calibrator(qt._float_model_buffer, num_threads=1, qsv_update_func=qsv_utils.min_max_update)
        cal.calibrate(data, qt._recipe_manager)
        return cal.get_model_qsvs()
    except (ImportError, AttributeError, TypeError):  # private API moved: fall back to the public one
        log.warning("ai_edge_quantizer: min/max calibration unavailable, using its moving average")
        return qt.calibrate(data, num_threads=1)


def full_integer(float_tflite: str | Path, out_path: str | Path, calib: dict[str, np.ndarray],
                 keep_fp32: Iterable[str] | None = None, float_regex: str | None = None,
                 fixed: dict[str, np.ndarray] | None = None, activation_bits: int = 8) -> dict:
    """Quantize `float_tflite` with static_wi8_ai8 (+ keep rules); `calib` maps each signature
    input name to samples [N, ...] (run one at a time); `fixed` inputs (the search program's
    gallery) are fed whole with every sample. Writes `out_path`."""
    import contextlib
    import io

    from ai_edge_quantizer import quantizer, recipe
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    keep = parse_keep(keep_fp32, "tflite_full")
    qt = quantizer.Quantizer(str(float_tflite))
    if activation_bits not in (8, 16):
        raise ValueError(f"activation_bits={activation_bits}: expected 8 or 16")
    qt.load_quantization_recipe(recipe.static_wi8_ai8() if activation_bits == 8 else recipe.static_wi8_ai16())
    rules = _keep_rules(keep)
    if float_regex:  # e.g. the ops of the program wrapper around the encoder core
        rules.append((float_regex, "*"))
    for regex, op in rules:
        qt.update_quantization_recipe(regex=regex, operation_name=op, algorithm_key=AlgorithmName.NO_QUANTIZE)
    from ai_edge_litert.interpreter import Interpreter

    sig = Interpreter(str(float_tflite)).get_signature_list()
    key = next(iter(sig))
    n = min(len(v) for v in calib.values())
    samples = [{**{k: np.ascontiguousarray(v[i:i + 1]) for k, v in calib.items()}, **(fixed or {})}
               for i in range(n)]
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):  # progress bars
        result = _calibrate(qt, {key: samples})
        qres = qt.quantize(result, enable_progress_bar=False, enable_progress_report=False)
    data = qres.quantized_model
    Path(out_path).write_bytes(bytes(data))
    log.info("TFLite full-integer int8: %d calibration samples, %d keep-float rules", n, len(rules))
    return {"keep_fp32": list(keep), "float_rules": [r for r, _ in rules]}


def scheme(keep_fp32: Sequence[str], activation_bits: int = 8) -> str:
    keep = ",".join(keep_fp32)
    a = activation_bits
    name = "a16w8" if a == 16 else "int8"
    return (f"{name} full-integer TFLite (ai_edge_quantizer static_wi8_ai{a}): weights per-channel "
            f"symmetric int8, activations int{a} calibrated (min/max), int{a} pixel input, float32 output "
            f"(l2-normalize float){'; float: ' + keep if keep else ''}")
