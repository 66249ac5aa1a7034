"""Why int8 image encoders drift from fp32 on real images, and which quantization recipe holds them
(benchmarks/results/quant_sensitivity.{md,json}):

    python benchmarks/studies/quant_sensitivity.py [run=PATH] [data=PATH] [model=student-tiny]
        [size=64] [steps=400] [out=benchmarks/results/quant_sensitivity] [recipes=histogram,minmax,minmax+flip]

Without run=, builds the real-image set of the test suite (tests/real_images.py: crops of photographs
and drawings that installed packages ship) in a temporary folder and trains `model` on it at `size`
px for `steps` CLIP-loss steps. Measured, on the image encoder, against the eager fp32 one:

1. recipes: each PT2E quantizer (XNNPACK, LiteRT), simulated eagerly on the converted graph, and ONNX
   Runtime's QDQ model run in ONNX Runtime, under each recipe of RECIPES:
   cosine mean / min on the test split and on dense patterns, and the worst inputs by name;
2. per layer: with the default (histogram) recipe, the cosine when only one layer group is int8 (what it loses
   alone) and when only it stays float (what keeping it float buys), on the test split and the patterns;
3. ranges: each layer group's output absmax per input on the calibration draw, the test split, the
   synthetic shapes and the dense patterns: how far the test and the patterns go past the range the
   calibration saw, and which inputs do.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[2] / "tests"))  # the real-image builder of the suite

from mcad.io import atomic_write_text, machine, now_iso, write_json  # noqa: E402
from mcad.quantize import pt2e  # noqa: E402
from mcad.quantize.recipe import Recipe  # noqa: E402

# "histogram": the quantizers' own ranges (PT2E histogram / MSE, ONNX Runtime percentile 99.999: the
# export's default); "minmax": the whole calibrated range; "+flip": mirrored calibration views too
RECIPES = {"histogram": Recipe(), "minmax": Recipe(act_observer="minmax"),
           "minmax+flip": Recipe(act_observer="minmax", calib_views=("flip",))}
# ONNX Runtime's activation ranges under each (the exporter passes its method to quantize_onnx)
ONNX_METHOD = {"histogram": "percentile", "minmax": "minmax", "minmax+flip": "minmax"}


# -- inputs ---------------------------------------------------------------------------------------
def dense_patterns(size: int) -> dict[str, np.ndarray]:
    """uint8 [3,S,S] images of the kind that drive activations to their extremes: fine checkerboards
    and stripes at full contrast in saturated colours, uniform noise, flat saturated colours."""
    rng = np.random.default_rng(0)
    i, j = np.arange(size)[:, None], np.arange(size)[None, :]
    out = {"noise": rng.integers(0, 256, (3, size, size))}
    for step in (1, 2, 4):
        c = (((i // step + j // step) % 2) * 255) * np.ones((size, size))
        out[f"checker{step}"] = np.stack([c, 255 - c, c])
        out[f"checker{step}_red_blue"] = np.stack([c, 0 * c, 255 - c])
    s = ((j % 3 == 0) * 255) * np.ones((size, 1))
    out["stripes"] = np.stack([s, 0 * s, 255 - s])
    for name, rgb in (("white", (255, 255, 255)), ("black", (0, 0, 0)), ("red", (255, 0, 0)), ("blue", (0, 0, 255))):
        out[name] = np.stack([np.full((size, size), v) for v in rgb])
    return {k: v.astype(np.uint8) for k, v in out.items()}


def synthetic_images(size: int, n: int = 64) -> np.ndarray:
    """uint8 [n,3,S,S] of the project's synthetic benchmark (its test split)."""
    from mcad.data.images import load_images
    from mcad.data.karpathy import load_karpathy
    from mcad.data.synthetic import generate

    with tempfile.TemporaryDirectory() as d:
        js = generate(d, seed=0, n_train=8, n_val=0, n_test=n, image_size=size, progress=False)
        return load_images(load_karpathy(js, split="test"), size, progress=False)[0]


class Inputs:
    """The encoder's inputs of every set, normalised as the student sees them, and their names."""

    def __init__(self, model, tokenizer, data, calib: int = 256):
        from mcad.data.images import normalize
        from mcad.quantize.calib import load_samples

        norm = lambda u8: normalize(u8, model.image_mean, model.image_std).numpy().astype(np.float32)  # noqa: E731
        self.calib = load_samples(model, tokenizer, data, n=calib, split="train").pixels
        test = load_samples(model, tokenizer, data, n=0, split="test", captions_per_image=0)
        self.test = test.pixels
        self.test_names = _test_names(data, len(self.test))
        pats = dense_patterns(model.image_size)
        self.patterns, self.pattern_names = norm(np.stack(list(pats.values()))), list(pats)
        self.synthetic = norm(synthetic_images(model.image_size))


def _test_names(data, n: int) -> list[str]:
    try:
        rows = json.loads(Path(data).read_text())["images"]
        names = [e["filename"] for e in rows if e.get("split") == "test"]
        return names if len(names) == n else [f"test[{i}]" for i in range(n)]
    except (OSError, ValueError, KeyError, TypeError):
        return [f"test[{i}]" for i in range(n)]


# -- measuring ------------------------------------------------------------------------------------
def unit(x: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(x.double(), dim=-1).numpy()


def run_b1(module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        t = torch.as_tensor(x)
        return unit(torch.cat([module(t[i:i + 1]) for i in range(len(t))]))


def cos_summary(c: np.ndarray, names: list[str], worst: int = 3) -> dict:
    order = np.argsort(c)[:worst]
    return {"mean": round(float(c.mean()), 4), "min": round(float(c.min()), 4),
            "worst": [[names[i], round(float(c[i]), 4)] for i in order]}


def group_of(node) -> str | None:
    """The layer group a graph node belongs to: a conv tower's body entry (conv + BN + ReLU), else its
    innermost module; None outside any module."""
    stack = [p for p, _ in (node.meta.get("nn_module_stack") or {}).values() if p]
    if not stack:
        return None
    p = stack[-1]
    return ".".join(p.split(".")[:3]) if p.startswith("tower.body.") else p


def quantize_with(encoder, calib, backend: str, recipe: Recipe, float_pred=None):
    """The converted PT2E graph of Core(encoder) under `recipe`, with `float_pred` nodes left float."""
    gm, _ = pt2e.quantize_core(encoder, calib, backend, keep_fp32=pt2e.DEFAULT_KEEP_FP32[backend] if float_pred is None else (),
                               recipe=recipe, extra_float=float_pred)
    return gm


def onnx_cosines(encoder, inputs: Inputs, recipe_name: str) -> dict[str, np.ndarray]:
    """The ONNX Runtime QDQ image encoder under `recipe`, run in ONNX Runtime."""
    import onnxruntime as ort

    from mcad.quantize.onnx_quant import quantize_onnx

    recipe = RECIPES[recipe_name]
    core = pt2e.Normalized(pt2e.Core(encoder)).eval()
    with tempfile.TemporaryDirectory() as d:
        fp, q = Path(d) / "fp.onnx", Path(d) / "q.onnx"
        with torch.no_grad():
            torch.onnx.export(core, (torch.as_tensor(inputs.calib[:1]),), str(fp), dynamo=True, opset_version=18,
                              external_data=False, input_names=["pixels"], output_names=["embedding"], verbose=False)
        quantize_onnx(fp, q, {"pixels": inputs.calib}, None, method=ONNX_METHOD[recipe_name], recipe=recipe)
        sess = ort.InferenceSession(str(q), providers=["CPUExecutionProvider"])
        out = {}
        for name, x in (("test", inputs.test), ("patterns", inputs.patterns)):
            emb = np.concatenate([sess.run(None, {"pixels": x[i:i + 1]})[0] for i in range(len(x))])
            out[name] = (unit(torch.as_tensor(emb)) * unit(core(torch.as_tensor(x)).detach())).sum(-1)
        return out


def recipes_section(encoder, inputs: Inputs, names: list[str]) -> dict:
    core = pt2e.Core(encoder).eval()
    ref = {"test": run_b1(core, inputs.test), "patterns": run_b1(core, inputs.patterns)}
    out = {}
    for rname in names:
        recipe = RECIPES[rname]
        for backend in ("xnnpack", "litert"):
            gm = quantize_with(encoder, inputs.calib, backend, recipe)
            out[f"{backend} {rname}"] = {
                s: cos_summary((run_b1(gm, x) * ref[s]).sum(-1), n)
                for s, x, n in (("test", inputs.test, inputs.test_names), ("patterns", inputs.patterns, inputs.pattern_names))}
        c = onnx_cosines(encoder, inputs, rname)
        out[f"onnx {rname}"] = {"test": cos_summary(c["test"], inputs.test_names),
                                "patterns": cos_summary(c["patterns"], inputs.pattern_names)}
        print(json.dumps({k: v for k, v in out.items() if k.endswith(rname)}), flush=True)
    return out


def layers_section(encoder, inputs: Inputs, recipe: Recipe) -> dict:
    """Per layer group: the cosine with only it int8, and with only it float (the rest int8)."""
    core = pt2e.Core(encoder).eval()
    groups = []
    for n in torch.export.export(core, (torch.as_tensor(inputs.calib[:1]),)).module().graph.nodes:
        g = group_of(n)
        if n.op == "call_function" and g and g not in groups:
            groups.append(g)
    sets = (("test", inputs.test, inputs.test_names), ("patterns", inputs.patterns, inputs.pattern_names))
    ref = {s: run_b1(core, x) for s, x, _ in sets}
    out = {}
    for g in groups:
        row = {}
        for mode, pred in (("only_int8", lambda n, g=g: group_of(n) != g), ("only_float", lambda n, g=g: group_of(n) == g)):
            gm = quantize_with(encoder, inputs.calib, "xnnpack", recipe, float_pred=pred)
            row[mode] = {s: cos_summary((run_b1(gm, x) * ref[s]).sum(-1), n, worst=1) for s, x, n in sets}
        out[g] = row
        print(g, json.dumps(row), flush=True)
    return out


def ranges_section(encoder, inputs: Inputs) -> dict:
    """Each layer group's output absmax per input: the calibration draw's largest, and how far the
    test split, the synthetic shapes and the dense patterns go past it (and which input does)."""
    core = pt2e.Core(encoder).eval()
    seen: dict[str, list] = {}
    hooks = []
    for name, mod in core.named_modules():
        top = name.startswith("tower.body.") and name.count(".") == 2
        if top or name in ("tower.pool_ln", "tower.pool_attn", "proj"):
            hooks.append(mod.register_forward_hook(
                lambda m, i, o, name=name: seen.setdefault(name, []).append(o.detach().abs().flatten(1).amax(1))))
    sets = {"calib": (inputs.calib, None), "test": (inputs.test, inputs.test_names),
            "synthetic": (inputs.synthetic, None), "patterns": (inputs.patterns, inputs.pattern_names)}
    per = {}
    try:
        for s, (x, _) in sets.items():
            seen.clear()
            with torch.no_grad():
                core(torch.as_tensor(x))
            per[s] = {k: torch.cat(v).numpy() for k, v in seen.items()}
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for layer, cal in per["calib"].items():
        row = {"calib_max": round(float(cal.max()), 3), "calib_p99": round(float(np.percentile(cal, 99)), 3)}
        for s in ("test", "synthetic", "patterns"):
            v = per[s][layer]
            row[f"{s}_max_over_calib"] = round(float(v.max() / max(cal.max(), 1e-9)), 3)
            row[f"{s}_share_over"] = round(float((v > cal.max()).mean()), 3)
            if sets[s][1] is not None:
                row[f"{s}_argmax"] = sets[s][1][int(v.argmax())]
        out[layer] = row
    return out


def _student(args: dict, work: Path):
    """(run folder, data) the study measures: run=/data= given, or a student trained here on the real-image set."""
    if "run" in args:
        from mcad.runs import run_record

        data = args.get("data") or (run_record(args["run"]).get("config") or {}).get("data")
        return Path(args["run"]), data
    from real_images import build, train_student

    js = build(work / "data", size=max(96, int(args.get("size", 64))))
    run = train_student(js, work / "run", args.get("model", "student-tiny"), int(args.get("size", 64)),
                        steps=int(args.get("steps", 400)))
    return run, str(js)


def markdown(res: dict) -> str:
    lines = [f"# Quantization sensitivity of the int8 image encoder on real images\n",
             f"`{res['command']}` ({res['date']}, {res['machine']}); student {res['student']}, data {res['data']}; "
             f"{res['n_calib']} calibration images, {res['n_test']} test images, {res['n_patterns']} dense patterns.\n",
             "## Recipes (cosine to eager fp32: mean / min, worst inputs)\n",
             "| quantizer, recipe | test mean | test min | worst test inputs | patterns mean | patterns min | worst patterns |",
             "|---|---|---|---|---|---|---|"]
    for k, r in res["recipes"].items():
        t, p = r["test"], r["patterns"]
        worst = lambda s: ", ".join(f"{n} {c:.3f}" for n, c in s["worst"])  # noqa: E731
        lines.append(f"| {k} | {t['mean']:.4f} | {t['min']:.4f} | {worst(t)} | {p['mean']:.4f} | {p['min']:.4f} | {worst(p)} |")
    lines += ["", f"Recipes: " + "; ".join(f"{k}: {v}" for k, v in res["recipe_text"].items()), "",
              "## Per layer group (XNNPACK, histogram recipe): cosine min on test / patterns\n",
              "| layer | only it int8 | only it float |", "|---|---|---|"]
    for g, r in res.get("layers", {}).items():
        cell = lambda m: f"{r[m]['test']['min']:.4f} ({r[m]['test']['worst'][0][0]}) / {r[m]['patterns']['min']:.4f}"  # noqa: E731
        lines.append(f"| {g} | {cell('only_int8')} | {cell('only_float')} |")
    lines += ["", "## Activation ranges (output absmax): calibration max, and the other sets' max over it\n",
              "| layer | calib max | calib p99 | test / calib | synthetic / calib | patterns / calib (share over) | pattern at max |",
              "|---|---|---|---|---|---|---|"]
    for g, r in res.get("ranges", {}).items():
        lines.append(f"| {g} | {r['calib_max']} | {r['calib_p99']} | {r['test_max_over_calib']} | "
                     f"{r['synthetic_max_over_calib']} | {r['patterns_max_over_calib']} ({r['patterns_share_over']}) | "
                     f"{r.get('patterns_argmax', '')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    args = dict(a.split("=", 1) for a in argv if "=" in a)
    bad = [a for a in argv if "=" not in a]
    if bad:
        print(__doc__)
        raise SystemExit(f"{bad[0]}: expected key=value")
    from mcad.export.encoders import Towers
    from mcad.runs import load_student

    torch.set_num_threads(1)
    out = Path(args.get("out", HERE.parents[1] / "results" / "quant_sensitivity"))
    t0 = time.time()
    with tempfile.TemporaryDirectory() as work:
        run, data = _student(args, Path(work))
        model, tok = load_student(run)
        encoder = Towers.of(model.eval()).encoder("image")
        inputs = Inputs(model, tok, data, int(args.get("calib", 256)))
        names = args.get("recipes", ",".join(RECIPES)).split(",")
        res = {"command": "python benchmarks/studies/quant_sensitivity.py " + " ".join(argv), "date": now_iso(),
               "machine": machine(), "student": model.config.get("name", "?") + f" {model.image_size} px",
               "data": str(data) if "run" in args else "tests/real_images.py (seed 0)",
               "n_calib": len(inputs.calib), "n_test": len(inputs.test), "n_patterns": len(inputs.patterns),
               "recipe_text": {k: RECIPES[k].describe() for k in names},
               "recipes": recipes_section(encoder, inputs, names)}
        if args.get("layers", "1") != "0":
            res["layers"] = layers_section(encoder, inputs, RECIPES["histogram"])
        res["ranges"] = ranges_section(encoder, inputs)
    res["seconds"] = round(time.time() - t0)
    write_json(out.with_suffix(".json"), res)
    atomic_write_text(out.with_suffix(".md"), markdown(res))
    print(f"wrote {out}.md and .json ({res['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
