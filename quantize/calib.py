"""Calibration and held-out sets drawn from a data set (any format `data=` takes; the training split
by default), preprocessed exactly as the model sees them: normalised pixels and token ids; and ONNX
Runtime's histogram calibration over them, streamed (one sample's activations held at a time)."""
from __future__ import annotations

import logging
import types
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("mcad.quantize")

DEFAULT_ROOT = Path("data/synth")  # the embedded default (mcad.data.spec names its file)


@dataclass
class Samples:
    """pixels float32 [N,3,S,S] (normalised), ids int64 [M,L]; one caption per image unless
    `captions_per_image` says otherwise; `caption_to_image` int64 [M]."""
    pixels: np.ndarray
    ids: np.ndarray
    caption_to_image: np.ndarray
    source: str

    def __len__(self) -> int:
        return len(self.pixels)


def resolve_data(data) -> "DataSpec":
    """The data set to draw from, as a checked `mcad.data.spec.DataSpec`: None is the embedded
    synthetic set; a path is a Karpathy JSON, a folder holding one (dataset_*.json), a CSV or
    webdataset shards (as `data=` takes them everywhere); a mapping is a run's recorded `data:` spec."""
    from mcad.data.spec import DEFAULT_SYNTH_ROOT, parse, synth_json

    if data is not None and not isinstance(data, (str, Path)):
        data = parse(data)
        if not data.is_default_synth():
            return data
        data = synth_json(data.get("root") or DEFAULT_SYNTH_ROOT)  # read as a Karpathy file, as before specs
    p = Path(data) if data is not None else synth_json(DEFAULT_ROOT)
    if p.is_dir():
        cands = sorted(p.glob("dataset_*.json"))
        if not cands:
            raise FileNotFoundError(f"{p}: no dataset_*.json in the data folder (run `make data`)")
        p = cands[0]
    if "{" not in str(p) and not p.exists():  # (a brace is a shard pattern, expanded by the reader)
        raise FileNotFoundError(f"{p}: no such data set (run `make data`, or pass data=<Karpathy JSON>)")
    return parse(str(p))


def _draw(n_images: int, n: int, seed: int) -> set[int]:
    """The images left out of a seeded draw of `n` (none when n covers them all)."""
    if not n or n >= n_images:
        return set()
    keep = set(np.random.default_rng(seed).choice(n_images, size=n, replace=False).tolist())
    return set(range(n_images)) - keep


def load_samples(model, tokenizer, data=None, n: int = 256, split: str = "train",
                 seed: int = 0, captions_per_image: int = 1, progress: bool = False) -> Samples:
    """`n` images (a seeded random draw from `split` of `data`, any format `resolve_data` takes) and
    `captions_per_image` of their captions (all of them with captions_per_image=0), as the student's inputs."""
    from mcad.data import spec as data_spec
    from mcad.data.images import load_images, normalize

    spec = resolve_data(data)
    if spec.format == "wds":  # shards are decoded as they are read: draw from the decoded split
        pixels_u8, corpus = data_spec.load_pixels(spec, split, model.image_size)
        drop = _draw(corpus.n_images, n, seed)
        pixels_u8, corpus = pixels_u8[[i for i in range(len(pixels_u8)) if i not in drop]], corpus.drop_images(drop)
    else:
        corpus = data_spec.load_corpus(spec, split)
        corpus = corpus.drop_images(_draw(corpus.n_images, n, seed))
        pixels_u8, corpus = load_images(corpus, model.image_size, progress=progress, view=getattr(model, "view", None))
    pixels = normalize(pixels_u8, model.image_mean, model.image_std).numpy().astype(np.float32)
    caps, c2i = [], []
    for img, cids in enumerate(corpus.image_captions()):
        take = cids if captions_per_image <= 0 else cids[:captions_per_image]
        caps += [corpus.captions[c] for c in take]
        c2i += [img] * len(take)
    ids = tokenizer.encode_batch(caps)
    where = spec.describe() if spec.format != "karpathy" else spec.get("json")
    log.info("%s: %d images, %d captions from split %s of %s", "samples", len(pixels), len(ids), split, where)
    return Samples(pixels, ids, np.asarray(c2i, dtype=np.int64), f"{where}:{split}")


# -- ONNX Runtime's histogram calibration, streamed --------------------------------------------------
# ORT's histogram calibrators (percentile, entropy, distribution) keep every calibrated tensor of every
# sample until the last one is run, then bin them: at 224 px with a few hundred samples that is GBs.
# The same histograms come from two passes that hold one sample at a time: the ranges first, then the
# counts, binned over those ranges with the same bin count (np.histogram assigns each value from the
# range and bin count alone, so summed counts equal the all-at-once ones and the ranges are exact).
def streamed_collect(cal, data_reader) -> None:
    """`collect_data` for an ORT HistogramCalibrater `cal`: leaves `cal.collector` as ORT's one-pass
    collection would, from two passes over `data_reader` (which must `rewind`). A tensor empty in
    every sample gets no histogram (ORT would bin it over [0, 1])."""
    from onnxruntime.quantization.calibrate import HistogramCollector

    if not hasattr(data_reader, "rewind"):
        raise ValueError(f"{type(data_reader).__name__}: streamed calibration reads the samples twice: give the "
                         "calibration reader a rewind() method")
    if cal.collector is not None:
        raise ValueError("streamed calibration collects once per calibrator (ORT's chunked collection is not streamed)")
    names = [o.name for o in cal.infer_session.get_outputs()]
    take = [(i, n) for i, n in enumerate(names) if n in cal.tensors_to_calibrate]
    absolute = cal.method == "percentile" and cal.symmetric  # ORT bins |x| over [min |x|, max |x|]
    stats: dict[str, list] = {}
    for outs in _runs(cal, data_reader):
        for i, name in take:
            x = np.asarray(outs[i]).ravel()
            if x.size == 0:
                continue
            s = [np.nanmin(x), np.nanmax(x)] + ([np.absolute(x).min(), np.absolute(x).max()] if absolute else [])
            old = stats.get(name, s)  # [min, max(, min |x|, max |x|)]
            stats[name] = [f(a, b) for f, a, b in zip((min, max, min, max), old, s)]
    if not stats:
        raise ValueError("No data is collected.")
    data_reader.rewind()
    hists: dict[str, list] = {}
    for outs in _runs(cal, data_reader):
        for i, name in take:
            if name not in stats:
                continue
            x = np.asarray(outs[i]).ravel()
            rng = (stats[name][2], stats[name][3]) if absolute else _symmetric(stats[name], x.dtype)
            h, edges = np.histogram(np.absolute(x) if absolute else x, bins=cal.num_bins, range=rng)
            if name in hists:
                hists[name][0] += h
            else:
                hists[name] = [h, edges, x.dtype]
    collector = HistogramCollector(method=cal.method, symmetric=cal.symmetric, num_bins=cal.num_bins,
                                   num_quantized_bins=cal.num_quantized_bins, percentile=cal.percentile,
                                   scenario=cal.scenario)
    for _, name in take:
        if name in hists:
            h, edges, dtype = hists[name]
            lo, hi = stats[name][:2]
            collector.histogram_dict[name] = ((h, edges.astype(dtype), lo, hi) if absolute
                                              else (h, edges, lo, hi, _symmetric(stats[name], dtype)[1]))
    cal.collector = collector


def _runs(cal, data_reader):
    """The calibrated model's outputs, one sample at a time."""
    while True:
        inputs = data_reader.get_next()
        if not inputs:
            return
        yield cal.infer_session.run(None, inputs)


def _symmetric(stat: list, dtype) -> tuple:
    """ORT's (-t, t) histogram range of a tensor binned by value, t = max(|min|, |max|)."""
    t = np.array(max(abs(stat[0]), abs(stat[1])), dtype=dtype)
    return (-t, t)


@contextmanager
def streamed_onnx_calibration():
    """While open, ORT's `quantize_static` calibrates its histogram methods with `streamed_collect`
    (one sample's tensors held at a time; same ranges); MinMax already keeps only reductions."""
    import importlib

    from onnxruntime.quantization.calibrate import HistogramCalibrater

    ort_quantize = importlib.import_module("onnxruntime.quantization.quantize")  # the module `quantize_static` reads
    create = ort_quantize.create_calibrator

    def create_streamed(*args, **kwargs):
        cal = create(*args, **kwargs)
        if isinstance(cal, HistogramCalibrater):
            cal.collect_data = types.MethodType(streamed_collect, cal)
        return cal

    ort_quantize.create_calibrator = create_streamed
    try:
        yield
    finally:
        ort_quantize.create_calibrator = create
