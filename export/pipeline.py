"""`make export`: quantize the run's student, lower it for a target, run every artifact in its
real runtime against the eager fp32 student, and write runs/<name>/export/<target>/ with a
manifest (docs/interfaces.md), tokenizer.json and golden.npz.

The exporter keeps only the sequence: plan -> calibrate -> build -> run -> check -> manifest. What
each target ships is one table (export.backends.BACKENDS), each backend one module there:
  cpu         ExecuTorch XNNPACK int8 .pte, ONNX int8 (QDQ), TFLite int8 (PT2E)
  snapdragon  ExecuTorch QNN (HTP, soc=SM8650|SM8750|...) .pte when $QNN_SDK_ROOT has a QNN SDK;
              always XNNPACK .pte + ONNX int8 + TFLite int8 (what Qualcomm AI Hub compiles);
              hub=1: AI Hub compile jobs for the SoC, compiled assets downloaded
  dimensity   TFLite full-integer A16W8 (int8 weights, int16 activations: NeuroPilot; A8W8 for NNAPI
              with npu_activation_bits=8), XNNPACK .pte, ExecuTorch MediaTek .pte when the
              NeuroPilot SDK's mtk_converter/mtk_neuron import
Each has a text and an image encoder, and search programs: ONNX Runtime's, QNN's and MediaTek's take
any gallery at run time; XNNPACK's and LiteRT's are made with a gallery bound in (gallery=,
export.bound) or when asked for (any_gallery_search=1), full-integer TFLite's only when asked for.
"""
from __future__ import annotations

import gc
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from mcad.artifacts import MANIFEST
from mcad.export import folder
from mcad.export.backends import TARGETS, module
from mcad.export.backends.common import Job, SdkMissing, eager_embed
from mcad.export.check import Heldout, judge, run_artifacts
from mcad.export.encoders import Towers
from mcad.export.manifest import manifest, write_golden
from mcad.export.options import Options
from mcad.io import atomic_path, folder_lock, sha256_file

log = logging.getLogger("mcad.export")

__all__ = ["TARGETS", "Exporter", "Options", "SdkMissing", "default_out", "export", "missing"]


def missing(opts: Options) -> list[tuple[str, str]]:
    """(backend, reason) for what this export cannot make here; raises SdkMissing under strict."""
    out = []
    for b in opts.plan():
        reason = module(b).missing()
        if reason is not None:
            out.append((b, reason))
    if opts.strict and out:
        raise SdkMissing(f"strict=1: {out[0][1]}")
    return out


class Exporter:
    """`towers` / `calib` given (the bench): those encoders, calibrated on those samples, no run's
    data needed; otherwise the run's student and samples of `opts.data`."""

    def __init__(self, opts: Options, towers: Towers | None = None, calib=None):
        from mcad.runs import STUDENT, latest_run, load_student, run_record

        self.opts = opts
        self.tokenizer = None
        if towers is None:
            self.run = Path(opts.run) if opts.run is not None else latest_run()
            model, self.tokenizer = load_student(self.run)
            if getattr(model, "kind", None) != "dual":
                raise ValueError(f"{self.run}: the run's student is not a dual encoder")
            towers = Towers.of(model.eval())
        else:
            self.run = Path(opts.run) if opts.run is not None else None
        student = self.run / STUDENT if self.run is not None else None
        self.student_sha = sha256_file(student) if student is not None and student.exists() else None
        # the run's manifest, read once: its data (which calibrates and checks the export unless data=
        # says otherwise: a student of a user's photos is not calibrated on the synthetic set; none for a
        # run from before manifests: the embedded default), its preprocessing and its teachers
        self.record = run_record(self.run) if self.run is not None else {}
        self.data = opts.data if opts.data is not None else (self.record.get("config") or {}).get("data")
        self.given_calib = calib
        if opts.parity and self.tokenizer is None:
            raise ValueError("parity needs the run's student and data (towers were given): pass parity=False")
        if set(opts.roles) - set(towers.roles):
            raise ValueError(f"roles={','.join(opts.roles)}: {towers.name} makes only {', '.join(towers.roles)}")
        self.missing = missing(opts)
        if opts.out is None and self.run is None:
            raise ValueError("out= is needed when no run folder is exported")
        bound = None
        if opts.gallery:
            from mcad.export.bound import load_gallery

            bound = load_gallery(opts.gallery, towers.embed_dim)
        out = Path(opts.out) if opts.out is not None else default_out(self.run, opts)
        self.job = Job(opts, towers, out, bound=bound)
        self.held: Heldout | None = None
        # a user's folder is refused before any work
        self.previous = folder.claim(out, self.planned_files())

    @property
    def out(self) -> Path:
        return self.job.out

    def planned_files(self) -> set[str]:
        """Every file name this export may write."""
        return {MANIFEST, "tokenizer.json", "golden.npz", *self.job.planned_files()}

    # -- the sequence ---------------------------------------------------------------------------
    def calibrate(self) -> None:
        """The calibration samples (train split) and, to check against, the held-out test split with
        the eager fp32 student's embeddings of it."""
        from mcad.quantize.calib import load_samples

        o, job = self.opts, self.job
        self.warn_same_rows()
        job.calib = self.given_calib if self.given_calib is not None else \
            load_samples(job.towers, self.tokenizer, self.data, n=o.calib, split="train", seed=o.seed)
        if "search" in o.roles:  # a calibration gallery for quantizers that see the whole search program
            job.calib_gallery = eager_embed(job.encoders["image"], torch.as_tensor(job.calib.pixels)).astype(np.float32)
        if self.tokenizer is None or (self.given_calib is not None and not o.parity):
            return  # calibration given, nothing checked: no held-out data, no golden file (the bench)
        job.test = load_samples(job.towers, self.tokenizer, self.data, n=o.parity_images, split="test",
                                seed=o.seed, captions_per_image=0)
        self.held = Heldout.of(job.test, job.encoders, o.queries, "search" in o.roles)

    def warn_same_rows(self) -> None:
        """One CSV or shard path serves every split: the calibration (train) and the parity check
        (test) read the same rows, so the parity figures are optimistic; said once, with the fix."""
        from mcad.data import spec as data_spec

        if self.given_calib is not None or self.data is None:
            return
        one = data_spec.single_file(data_spec.parse(self.data))
        if one is not None:
            key, path = one
            log.warning("data.%s=%s: one file serves every split, so the int8 calibration and the parity check "
                        "read the same rows (the parity figures are optimistic); give per-split files "
                        "(ARGS=\"data.%s={train: ..., test: ...}\") or another set (ARGS=\"data=...\")", key, path, key)

    def build(self) -> None:
        """Each backend of the plan writes its artifacts (or says why it cannot here)."""
        from tqdm import tqdm

        o = self.opts
        for backend, reason in self.missing:
            log.info("%s: skipping %s: %s", o.target, backend, reason)
        for backend in tqdm(o.plan(), desc=f"export {o.target}", unit="backend", disable=not o.progress):
            t0 = time.perf_counter()
            module(backend).build(self.job)
            gc.collect()  # its quantized graphs and lowered programs hold reference cycles: free them before the next
            log.info("%s: %s built in %.1f s (%s)", o.target, backend, time.perf_counter() - t0, rss())

    def check(self) -> dict:
        """Run every artifact in its runtime on the held-out data; the parity record, a verdict per artifact."""
        t0 = time.perf_counter()
        run_artifacts(self.job.artifacts, self.held)
        bound = self.job.bound
        parity = judge(self.job.artifacts, self.held, bound.rows if bound is not None else None, self.job.simulated)
        log.info("%s: parity checks in %.1f s (%s)", self.opts.target, time.perf_counter() - t0, rss())
        return parity

    def export(self) -> dict:
        """calibrate -> build -> run and check -> manifest; returns the manifest as written (JSON).
        The manifest is written last, when every file it lists is in place: a re-export first takes
        the previous one away (readers refuse the folder until the new one is there)."""
        self.calibrate()  # before the folder is touched: a data set that cannot be used leaves nothing
        log.info("%s: samples loaded (%s)", self.opts.target, rss())
        made = folder.begin(self.out, self.planned_files())
        try:
            with folder_lock(self.out, "export", remove=True):  # one writer per export folder
                self.build()
                if self.tokenizer is not None:
                    with atomic_path(self.out / "tokenizer.json") as tmp:
                        shutil.copyfile(self.run / "tokenizer.json", tmp)
                golden = write_golden(self.job, self.held, self.tokenizer).name if self.held is not None else None
                parity = self.check() if self.opts.parity else None
                record = manifest(self.job, self.run, self.student_sha, self.record, parity, golden,
                                  tokenizer=self.tokenizer is not None).to_json()
                folder.commit(self.out, record, self.previous)
        except BaseException:
            folder.abandon(self.out, made, self.planned_files())
            raise
        return record


def rss() -> str:
    """This process's resident memory now and at its peak (Linux's /proc; elsewhere the peak alone)."""
    try:
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        now, peak = (int(status[k].split()[0]) // 1024 for k in ("VmRSS", "VmHWM"))
        return f"RSS {now} MB, peak {peak} MB"
    except (OSError, KeyError, ValueError):
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, KB elsewhere
        return f"peak RSS {peak // (1 << 20 if sys.platform == 'darwin' else 1 << 10)} MB"


def default_out(run: Path, opts: Options) -> Path:
    """runs/<name>/export/<target>, or <target>-bound for an export with a gallery bound in (so the
    target's general export, which takes any gallery, stays as it is)."""
    return Path(run) / "export" / (opts.target + ("-bound" if opts.gallery else ""))


def export(opts: Options) -> dict:
    return Exporter(opts).export()
