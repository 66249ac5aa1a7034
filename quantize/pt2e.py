"""PT2E int8 post-training quantization of the encoders the student ships.

Weights per-channel symmetric int8, activations int8 from calibration (static), through one of
three quantizers: XNNPACK (ExecuTorch CPU), QNN (ExecuTorch Qualcomm HTP) or LiteRT's PT2E
quantizer (TFLite). What stays in float is configurable (`keep_fp32`): the final L2
normalisation always does (it is a few flops, and a quantized rsqrt/mul there costs accuracy);
on top of it any of the aliases in KEEP_ALIASES or a module path glob (`tower.blocks.0.*`).

The quantized graph is the encoder *without* its normalisation (`Core`); `Normalized` and
`export.programs.Search` wrap it back, so the float tail is outside the quantized region.
"""
from __future__ import annotations

import fnmatch
import logging
import os
import tempfile
from contextlib import contextmanager
from typing import Iterable, Sequence

import torch
from torch import nn

from mcad.models.layers import l2_normalize

log = logging.getLogger("mcad.quantize")

# alias -> what it matches: module paths (globs over the Core's qualified names), module type
# names (the class name), aten op names.
# "ops_in": ops whose innermost module is of that type (the attention score path: scale, additive
# causal mask of -1e4, softmax; an int8 add of the mask would flatten every score).
KEEP_ALIASES: dict[str, dict] = {
    "proj": {"modules": ("proj",)},                       # the final projection into the shared space
    "embedding": {"types": ("Embedding",)},               # token embedding table
    "softmax": {"ops": ("softmax", "_softmax"),            # attention softmax and the scores feeding it
                "ops_in": {"Attention": ("add", "mul", "softmax", "_softmax")}},
    "attention_matmul": {"ops_in": {"Attention": ("matmul", "bmm", "mm", "expand", "view", "reshape",
                                                   "_unsafe_view", "transpose", "permute", "clone")}},
    "layernorm": {"types": ("LayerNorm",)},
    "attention": {"types": ("Attention",)},
    "pool": {"modules": ("tower.pool_attn", "tower.pool_attn.*", "tower.pool_ln")},  # attention pooling head
    "first_conv": {"modules": ("tower.body.0", "tower.body.0.*", "tower.patch")},
}
# Defaults per quantizer, measured on a trained student-tiny (synthetic test split, cosine to fp32):
# with everything int8 the text tower falls to cos ~0.52 (the -1e4 causal mask added in int8);
# QNN and full-integer TFLite also need the attention matmuls (activation x activation) in float
# (text min cos 0.84 / 0.77 otherwise). The image tower is fine either way.
DEFAULT_KEEP_FP32: dict[str, tuple[str, ...]] = {
    "xnnpack": ("softmax",), "litert": ("softmax",), "onnx": ("softmax",),
    "qnn": ("softmax", "attention_matmul", "pool"), "tflite_full": ("softmax", "attention_matmul", "pool"),
    "mediatek": ("softmax", "attention_matmul"),
}
DEFAULT_KEEP_FP32["qnn16"] = DEFAULT_KEEP_FP32["qnn"]
# qnn16: the QNN quantizer with 16-bit activations (A16W8), which HTP runs natively
BACKENDS = ("xnnpack", "qnn", "qnn16", "litert")


class Core(nn.Module):
    """An ImageEncoder / TextEncoder without its final L2 normalisation (what gets quantized)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.tower = encoder.visual if hasattr(encoder, "visual") else encoder.text
        self.proj = encoder.proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.tower(x))


class Normalized(nn.Module):
    """core(x) followed by the float L2 normalisation: same contract as the shipped encoder."""

    def __init__(self, core: nn.Module):
        super().__init__()
        self.core = core

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return l2_normalize(self.core(x))


# -- what stays float ---------------------------------------------------------------------------
def parse_keep(keep: str | Iterable[str] | None, backend: str = "xnnpack") -> tuple[str, ...]:
    """`keep_fp32` from config/CLI: None (the backend's default), "" / "none", "proj,softmax", or
    a list."""
    if keep is None:
        return DEFAULT_KEEP_FP32.get(backend, DEFAULT_KEEP_FP32["xnnpack"])
    if isinstance(keep, str):
        keep = [k for k in keep.replace(" ", "").split(",") if k and k.lower() != "none"]
    out = tuple(str(k) for k in keep)
    for k in out:
        if k not in KEEP_ALIASES and not any(c in k for c in "*.?[") and k not in ("tower",):
            raise ValueError(f"keep_fp32: unknown entry {k!r} (aliases: {', '.join(KEEP_ALIASES)}; "
                             f"or a module path such as tower.blocks.0)")
    return out


def resolve_keep(keep: Sequence[str]):
    """`keep` names and aliases -> (module patterns, module types, op names, {type: op names})."""
    modules, types, ops, ops_in = [], set(), set(), {}
    for k in keep:
        spec = KEEP_ALIASES.get(k, {"modules": (k, f"{k}.*")})
        modules += spec.get("modules", ())
        types.update(spec.get("types", ()))
        ops.update(spec.get("ops", ()))
        for t, o in spec.get("ops_in", {}).items():
            ops_in.setdefault(t, set()).update(o)
    return modules, types, ops, ops_in


def keep_predicate(keep: Sequence[str]):
    """node -> True when the node belongs to something that stays float."""
    modules, types, ops, ops_in = resolve_keep(keep)

    def pred(node: torch.fx.Node) -> bool:
        if node.op != "call_function":
            return False
        name = getattr(getattr(node.target, "_overloadpacket", None), "__name__", str(node.target))
        name = name.split(".")[-1]
        if name in ops:
            return True
        stack = list((node.meta.get("nn_module_stack") or {}).values())
        if stack and stack[-1][1] and name in ops_in.get(stack[-1][1].rsplit(".", 1)[-1], ()):
            return True
        for path, type_str in stack:
            if type_str and type_str.rsplit(".", 1)[-1] in types:
                return True
            if any(fnmatch.fnmatchcase(path, m) for m in modules):
                return True
        return False

    return pred


def strip_annotations(gm: torch.fx.GraphModule, pred) -> int:
    """Drop the quantization annotation of every node `pred` selects (and of any node whose
    annotation shares a spec with a dropped one). Returns how many nodes stay float."""
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, SharedQuantizationSpec

    key = "quantization_annotation"
    dropped: set[torch.fx.Node] = set()

    def drop(n: torch.fx.Node) -> None:
        n.meta[key] = QuantizationAnnotation(_annotated=True)
        dropped.add(n)

    for n in gm.graph.nodes:
        if pred(n) and key in n.meta:
            drop(n)
    changed = True
    while changed:  # shared specs that point at a dropped node/edge would dangle
        changed = False
        for n in gm.graph.nodes:
            ann = n.meta.get(key)
            if ann is None or n in dropped:
                continue
            specs = list(ann.input_qspec_map.values()) + [ann.output_qspec]
            for s in specs:
                if isinstance(s, SharedQuantizationSpec):
                    ref = s.edge_or_node
                    nodes = ref if isinstance(ref, tuple) else (ref,)
                    if any(x in dropped for x in nodes):
                        drop(n)
                        changed = True
                        break
    return len(dropped)


class KeepFloat:
    """Wraps a PT2E quantizer: annotate as usual, then un-annotate what stays float (`keep` names
    and aliases, and whatever node predicate `extra` selects)."""

    def __init__(self, base, keep: Sequence[str], extra=None):
        self.base, self.keep, self.extra = base, tuple(keep), extra
        self.n_float = 0

    def __getattr__(self, name):
        return getattr(self.base, name)

    def transform_for_annotation(self, model):
        return self.base.transform_for_annotation(model)

    def annotate(self, model):
        model = self.base.annotate(model)
        if self.keep or self.extra is not None:
            pred, extra = keep_predicate(self.keep), self.extra
            self.n_float = strip_annotations(model, pred if extra is None else (lambda n: pred(n) or extra(n)))
        return model

    def validate(self, model):
        return self.base.validate(model)


def as_quantizer(base, keep: Sequence[str], extra=None):
    """A real `Quantizer` subclass instance (prepare_pt2e checks the type)."""
    from torchao.quantization.pt2e.quantizer import Quantizer

    wrapper = KeepFloat(base, keep, extra)

    class _Q(Quantizer):
        def transform_for_annotation(self, model):
            return wrapper.transform_for_annotation(model)

        def annotate(self, model):
            return wrapper.annotate(model)

        def validate(self, model):
            return wrapper.validate(model)

    q = _Q()
    q.wrapper = wrapper
    q.base = base
    return q


# -- the three quantizers -------------------------------------------------------------------------
def _ranged(config, recipe):
    """A PT2E QuantizationConfig whose activation observers follow `recipe` (weights as they are);
    the quantizer's own config where the recipe asks for its own (histogram) ranges."""
    from dataclasses import replace

    from torchao.quantization.pt2e.observer import MinMaxObserver

    if recipe.act_observer == "histogram":
        return config
    obs = {"minmax": MinMaxObserver}[recipe.act_observer]
    act = {}
    for key in ("input_activation", "output_activation"):
        spec = getattr(config, key)
        if spec is not None and not spec.is_dynamic:
            act[key] = replace(spec, observer_or_fake_quant_ctr=obs.with_args(eps=2 ** -12))
    return replace(config, **act)


def xnnpack_quantizer(recipe=None):
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer, get_symmetric_quantization_config)

    from mcad.quantize.recipe import DEFAULT

    config = _ranged(get_symmetric_quantization_config(is_per_channel=True), recipe or DEFAULT)
    return XNNPACKQuantizer().set_global(config)


def litert_quantizer(recipe=None):
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config

    from mcad.quantize.recipe import DEFAULT

    config = _ranged(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False), recipe or DEFAULT)
    return PT2EQuantizer().set_global(config)


def qnn_sdk_root() -> str | None:
    """$QNN_SDK_ROOT when it points at a real QNN SDK (one with the HTP backend library)."""
    root = os.environ.get("QNN_SDK_ROOT")
    if root and os.path.isfile(os.path.join(root, "lib", "x86_64-linux-clang", "libQnnHtp.so")):
        return root
    return None


@contextmanager
def qnn_import_guard():
    """Importing executorch.backends.qualcomm without QNN_SDK_ROOT tries to download the SDK
    (and fails offline). Point it at an empty folder for the import when the variable is unset or
    names no folder; the quantizer works without the SDK, lowering does not."""
    import contextlib
    import io

    old = os.environ.get("QNN_SDK_ROOT")
    tmp = None
    if not old or not os.path.isdir(old):
        tmp = tempfile.mkdtemp(prefix="mcad-no-qnn-sdk-")
        os.environ["QNN_SDK_ROOT"] = tmp
    try:
        if tmp is not None:  # its "[QNN] Using QNN SDK at <empty folder>" line would mislead
            with contextlib.redirect_stdout(io.StringIO()):
                yield
        else:
            yield
    finally:
        if tmp is not None:
            if old is None:
                os.environ.pop("QNN_SDK_ROOT", None)
            else:
                os.environ["QNN_SDK_ROOT"] = old
            os.rmdir(tmp)


def qnn_chipset(soc: str):
    with qnn_import_guard():
        from executorch.backends.qualcomm.serialization.qc_schema import QcomChipset
    name = str(soc).upper()
    if not hasattr(QcomChipset, name):
        known = ", ".join(s for s in QcomChipset.__members__ if s.startswith("SM"))
        raise ValueError(f"soc={soc}: unknown Snapdragon SoC (known: {known})")
    return getattr(QcomChipset, name)


def qnn_quantizer(soc: str = "SM8650", activation_bits: int = 8):
    """HTP's quantizer: weights per-channel int8, activations 8-bit (A8W8) or 16-bit (A16W8)."""
    with qnn_import_guard():
        from executorch.backends.qualcomm.quantizer.quantizer import QnnQuantizer, QuantDtype
        from executorch.backends.qualcomm.serialization.qc_schema import QnnExecuTorchBackendType

    q = QnnQuantizer(backend=QnnExecuTorchBackendType.kHtpBackend, soc_model=qnn_chipset(soc), strict=False)
    dtype = QuantDtype.use_16a8w if activation_bits == 16 else QuantDtype.use_8a8w
    q.set_default_quant_config(dtype, is_conv_per_channel=True, is_linear_per_channel=True)
    return q


def make_quantizer(backend: str, soc: str = "SM8650", recipe=None):
    """The PT2E quantizer of `backend`; XNNPACK's and LiteRT's activation ranges follow `recipe`
    (quantize.recipe; None: its defaults). QNN's are the HTP quantizer's own."""
    if backend == "xnnpack":
        return xnnpack_quantizer(recipe)
    if backend in ("qnn", "qnn16"):
        return qnn_quantizer(soc, 16 if backend == "qnn16" else 8)
    if backend == "litert":
        return litert_quantizer(recipe)
    raise ValueError(f"unknown PT2E quantizer backend {backend!r} ({', '.join(BACKENDS)})")


# -- quantize ------------------------------------------------------------------------------------
def batches(x, size: int = 1):
    x = torch.as_tensor(x)
    for s in range(0, len(x), size):
        yield x[s:s + size]


def calibration_views(calib, recipe=None) -> torch.Tensor:
    """The calibration inputs the observers see: `calib` and, for images [N,3,H,W], the extra views
    `recipe.calib_views` names (token ids are fed as they are)."""
    from mcad.quantize.recipe import DEFAULT

    calib = torch.as_tensor(calib)
    if calib.is_floating_point() and calib.dim() == 4 and "flip" in (recipe or DEFAULT).calib_views:
        calib = torch.cat([calib, calib.flip(-1)])
    return calib


def quantize_core(encoder: nn.Module, calib, backend: str = "xnnpack", keep_fp32: Sequence[str] = (),
                  soc: str = "SM8650", progress: bool = False, desc: str = "calibrate", recipe=None,
                  extra_float=None):
    """(converted PT2E GraphModule of Core(encoder), quantizer used). `calib`: the encoder's
    inputs [N,...] (ids int64 or normalised pixels); run one at a time (the shipped batch is 1).
    `recipe`: how activations are ranged (quantize.recipe; None: its defaults); `extra_float`: a
    graph-node predicate of more nodes to leave float (studies)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from tqdm import tqdm

    core = Core(encoder).eval()
    calib = calibration_views(calib, recipe)
    example = (calib[:1],)
    base = make_quantizer(backend, soc, recipe)
    quantizer = as_quantizer(base, parse_keep(keep_fp32, backend), extra_float)
    with torch.no_grad():
        gm = torch.export.export(core, example).module()
        prepared = prepare_pt2e(gm, quantizer)
        for x in tqdm(batches(calib), total=len(calib), desc=desc, unit="sample", disable=not progress,
                      leave=False):
            prepared(x)
        converted = convert_pt2e(prepared, fold_quantize=backend != "litert")
    log.info("%s: PT2E %s, %d calibration samples, %d nodes kept float (%s)", desc, backend,
             len(calib), quantizer.wrapper.n_float, ",".join(quantizer.wrapper.keep) or "-")
    return converted, base


def scheme(backend: str, keep_fp32: Sequence[str]) -> str:
    keep = ",".join(keep_fp32)
    if backend == "qnn16":
        return (f"A16W8 PT2E static (qnn quantizer): weights per-channel int8, activations 16-bit "
                f"calibrated; float: l2-normalize{(',' + keep) if keep else ''}")
    return (f"int8 PT2E static ({backend} quantizer): weights per-channel symmetric int8, activations "
            f"int8 calibrated; float: l2-normalize{(',' + keep) if keep else ''}")
