"""What gets benchmarked: the run's trained student (its export, or artifacts exported here while
no export exists), the mobile-size student config (random weights), and the peers: the CLIP
ViT-B/32 text tower (63M params) and a MobileViT-small image tower (random weights, transformers).
Whatever is exported here goes through mcad.export (benchmarks/artifacts.py).

Each subject carries export-manifest artifacts (mcad.artifacts) plus the inputs its jobs need:
token ids for its encoder, and the tokenizer whose cost is timed as the `tokenize` stage.

Nothing is timed unverified: every artifact of a run's export is checked against its manifest's
sha256 (mcad.artifacts.verify_artifact, as search and index do), an export folder holding programs
but no manifest is refused, and so is an export whose parity failed, unless allow_failed_parity=1
asks to bench it (its rows then say PARITY FAILED); the gate never takes one."""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mcad.artifacts import (MANIFEST, Artifact, ExportManifest, ManifestError, find_manifests, load_manifest,
                            parity_failures, rebuild_command, unfinished_export)
from mcad.io import sha256_file

log = logging.getLogger("mcad.benchmarks")
# made artifacts and peers: under the checkout the command runs in (cwd), never inside the installed package
DEFAULT_CACHE = Path("build") / "bench-cache"
CLIP_SOT, CLIP_EOT = 49406, 49407

# CLIP ViT-B/32's text tower (openai/clip-vit-base-patch32): 63.4M parameters with the projection.
CLIP_B32_TEXT = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                     num_attention_heads=8, max_position_embeddings=77, projection_dim=512,
                     hidden_act="quick_gelu", bos_token_id=CLIP_SOT, eos_token_id=CLIP_EOT, pad_token_id=0)
# apple/mobilevit-small's image tower (MobileViTConfig defaults), 256 px.
MOBILEVIT_SMALL = dict(image_size=256)
# Toy sizes, for tests only (peers=tiny): same code path, seconds instead of minutes.
CLIP_TINY_TEXT = dict(CLIP_B32_TEXT, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, projection_dim=64, vocab_size=49408)
MOBILEVIT_TINY = dict(image_size=64, hidden_sizes=[32, 40, 48], neck_hidden_sizes=[8, 16, 24, 32, 40, 48, 96])


@dataclass
class Subject:
    name: str                        # student | student-mobile | clip-vit-b32-text | mobilevit-small
    kind: str                        # ours | peer
    artifacts: list[Artifact]
    ids: Path | None = None          # int64 [Q, L]: the text encoder's inputs
    tokenizer: Path | None = None    # timed as `tokenize`
    tokenizer_feeds_encoder: bool = False
    context_length: int | None = None
    embed_dim: int | None = None
    image_size: int | None = None
    params: dict = field(default_factory=dict)
    source: str = ""                 # where the artifacts come from
    notes: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    parity_failed: dict = field(default_factory=dict)  # artifact file -> the manifest whose parity it failed

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "params": self.params, "source": self.source,
                "embed_dim": self.embed_dim, "context_length": self.context_length, "image_size": self.image_size,
                "tokenizer": str(self.tokenizer) if self.tokenizer else None,
                "tokenizer_feeds_encoder": self.tokenizer_feeds_encoder, "notes": self.notes,
                "skipped": self.skipped, "parity_failed": dict(self.parity_failed),
                "artifacts": [{"name": a.name, "role": a.role, "runtime": a.runtime, "backend": a.backend,
                               "quantization": a.quantization, "file": str(a.path), "bytes": a.bytes}
                              for a in self.artifacts]}


def default_queries(n: int = 16, seed: int = 0) -> list[str]:
    """Captions in the synthetic benchmark's style (fixed seed)."""
    from mcad.data.synthetic import all_scenes, captions_for

    rng = random.Random(seed)
    scenes = all_scenes()
    rng.shuffle(scenes)
    out: list[str] = []
    for sc in scenes:
        out.extend(captions_for(sc, rng, 1))
        if len(out) >= n:
            break
    return out[:n]


def _select(arts: list[Artifact], runtimes: list[str], quants: list[str] | None) -> list[Artifact]:
    keep = [a for a in arts if a.runtime in runtimes]
    if quants:
        keep = [a for a in keep if quant_family(a.quantization) in quants]
    return keep


def quant_family(q: str) -> str:
    """'int8 static QDQ per-channel' -> 'int8'; 'fp32'/'float32'/'' -> 'fp32'; others as given."""
    q = (q or "").lower()
    for fam in ("a16w8", "int8", "int4", "int16", "fp16", "w8a8", "w8a16", "w4a8"):
        if fam in q:
            return "int8" if fam == "w8a8" else fam
    if not q or any(s in q for s in ("fp32", "float32", "float", "none")):
        return "fp32"
    return q


def calib_samples(ids: np.ndarray | None, image_size: int, what: str, n_images: int = 4, seed: int = 0):
    """Calibration of a bench-made int8 variant: the queries' token ids and a few random images
    (normalised-pixel scale); no data set needed."""
    from mcad.quantize.calib import Samples

    ids = np.zeros((0, 1), np.int64) if ids is None else ids[:8].astype(np.int64)
    rng = np.random.default_rng(seed)
    px = rng.standard_normal((n_images if image_size else 0, 3, image_size or 1, image_size or 1), dtype=np.float32)
    return Samples(px, ids, np.zeros(len(ids), np.int64), f"bench: {len(ids)} {what} queries, {len(px)} random images")


def _made(manifests: list[ExportManifest], runtimes: list[str], quants: list[str]) -> list[Artifact]:
    return [a for m in manifests for a in _select(m.artifacts, runtimes, quants)]


def _save_ids(path: Path, ids: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, ids.astype(np.int64))
    return path


# -- the run's student -------------------------------------------------------------------------
def student_subject(run: Path, work: Path, runtimes: list[str], quants: list[str] | None, texts: list[str],
                    target: str | None = None, cache: Path | None = None,
                    make_quants: list[str] = ("fp32", "int8")) -> Subject:
    """The trained student: its export manifests when `make export` ran (filtered by `quants` when
    given), else artifacts made here (`make_quants`)."""
    from mcad.runs import resolve_run
    from mcad.tokenizer import Tokenizer

    run = resolve_run(run)
    check_export_folders(run, target)
    manifests = pick_manifests(run, target)
    tok_path = run / "tokenizer.json"
    if manifests:
        arts, skipped, notes = [], [], []
        ids = None
        first: ExportManifest | None = None
        seen: set[str] = set()
        failed: dict[str, str] = {}
        for mp in manifests:
            m = load_manifest(mp, verify=True)  # every file against its sha256, before anything is timed
            first = first or m
            failed.update({f: str(mp) for f in parity_failures(m)})
            for a in _select(m.artifacts, runtimes, quants):
                key = a.sha256 or sha256_file(a.path)
                if key in seen:  # the same file exported for two targets: run it once
                    continue
                seen.add(key)
                arts.append(a)
            skipped += [dict(s, target=m.target) for s in m.skipped]
            if ids is None:
                ids = m.golden_ids()
            if m.tokenizer_path is not None:
                tok_path = m.tokenizer_path
        tok = Tokenizer.load(tok_path, context_length=first.context_length)
        if ids is None or ids.shape[-1] != first.context_length:
            ids = tok.encode_batch(texts)
            notes.append("encoder ids: the queries tokenized with the run's tokenizer")
        else:
            notes.append("encoder ids: golden ids from the export")
        src = ", ".join(str(p.relative_to(run)) for p in manifests)
        if not arts:
            log.warning("student: the export manifests (%s) list no artifact for runtimes %s / quantization %s",
                        src, runtimes, quants)
        return Subject("student", "ours", arts, ids=_save_ids(work / "ids_student.npy", ids), tokenizer=tok_path,
                       tokenizer_feeds_encoder=True, context_length=first.context_length,
                       embed_dim=first.embed_dim, image_size=first.image_size or None,
                       params=_params_from_run(run), source=f"export: {src}", notes=notes, skipped=skipped,
                       parity_failed=failed)

    from mcad.benchmarks.artifacts import build_variants, cache_key
    from mcad.runs import load_student

    model, tok = load_student(run)
    L, D, S = model.context_length, model.embed_dim, model.image_size
    quants = list(quants or make_quants)
    folder = (cache or run / "bench" / "artifacts") / f"student-{cache_key('student', sha256_file(run / 'student.safetensors'))}"
    ids = tok.encode_batch(texts)
    manifests, skipped = build_variants(folder, runtimes, quants, calib_samples(ids, S, "tokenized"), run=run)
    return Subject("student", "ours", _made(manifests, runtimes, quants), ids=_save_ids(work / "ids_student.npy", ids),
                   tokenizer=tok_path, tokenizer_feeds_encoder=True, context_length=L, embed_dim=D, image_size=S,
                   params=_params(model), source=f"bench-made by mcad.export from {run.name}/student.safetensors "
                                                 f"(no export found)",
                   notes=["no runs/<name>/export/*/manifest.json: exported here (fp32/int8 as listed)"],
                   skipped=skipped)


def check_export_folders(run: Path, target: str | None) -> None:
    """The export folders the bench would read (the target's; without one, cpu's when there is a
    cpu folder, else all) hold a manifest wherever they hold programs: a folder without one (an
    export killed before writing it) is one line with the command that rebuilds it, not skipped
    for another target or a bench-made stand-in."""
    export = Path(run) / "export"
    if target and target != "all":
        folders = [export / target]
    elif target is None and (export / "cpu").is_dir():
        folders = [export / "cpu"]
    else:
        folders = sorted(p for p in export.iterdir() if p.is_dir()) if export.is_dir() else []
    for f in folders:
        progs = unfinished_export(f)
        if progs:
            shown = ", ".join(progs[:3]) + (f" and {len(progs) - 3} more" if len(progs) > 3 else "")
            raise ManifestError(f"{f}: holds {shown} but no {MANIFEST} (an export that did not finish, or files "
                                f"copied in); rebuild: {rebuild_command(f.name, str(run))}")


def pick_manifests(run: Path, target: str | None) -> list[Path]:
    """`target=all`: every export target; a name: that one (error if missing); None: cpu when exported,
    else every target there is."""
    if target == "all":
        return find_manifests(run)
    if target:
        found = find_manifests(run, target)
        if not found:
            have = ", ".join(p.parent.name for p in find_manifests(run)) or "none"
            raise FileNotFoundError(f"{run}/export/{target}/manifest.json: no such export (exported targets: {have})")
        return found
    return find_manifests(run, "cpu") or find_manifests(run)


def _params(model) -> dict:
    return {"text": sum(p.numel() for p in model.text.parameters()) + model.text_proj.weight.numel(),
            "image": sum(p.numel() for p in model.visual.parameters()) + model.image_proj.weight.numel()}


def _params_from_run(run: Path) -> dict:
    try:
        from mcad.runs import load_student

        model, _ = load_student(run)
        return _params(model)
    except Exception:  # params are informative only
        return {}


# -- the mobile-size student (random weights) --------------------------------------------------
def mobile_subject(work: Path, runtimes: list[str], quants: list[str], tokenizer: Path | None, texts: list[str],
                   cache: Path = DEFAULT_CACHE, seed: int = 0) -> Subject:
    import torch

    from mcad.benchmarks.artifacts import build_variants, cache_key, random_ids
    from mcad.export.encoders import Towers
    from mcad.models.registry import create_model, model_config

    cfg = model_config("student-mobile")
    torch.manual_seed(seed)
    model = create_model("student-mobile").eval()
    L, D, S = model.context_length, model.embed_dim, model.image_size
    t = cfg["text"]
    ids = random_ids(len(texts), L, t["vocab_size"], CLIP_SOT, t.get("eot_id", CLIP_EOT), t.get("pad_id", 0), seed)
    manifests, skipped = build_variants(cache / f"student-mobile-{cache_key('student-mobile', cfg, seed)}", runtimes,
                                        quants, calib_samples(ids, S, "random-id"), towers=Towers.of(model))
    return Subject("student-mobile", "ours", _made(manifests, runtimes, quants),
                   ids=_save_ids(work / "ids_student_mobile.npy", ids), tokenizer=tokenizer,
                   tokenizer_feeds_encoder=False, context_length=L, embed_dim=D, image_size=S, params=_params(model),
                   source="student-mobile config, random weights, exported here by mcad.export",
                   notes=["random CLIP-vocabulary ids (no CLIP BPE offline); tokenize timed with the run's tokenizer"],
                   skipped=skipped)


# -- peers ---------------------------------------------------------------------------------------
def clip_text_subject(work: Path, runtimes: list[str], quants: list[str], tokenizer: Path | None, texts: list[str],
                      cache: Path = DEFAULT_CACHE, seed: int = 0, tiny: bool = False) -> Subject:
    import torch

    from mcad.benchmarks.artifacts import build_variants, cache_key, random_ids
    from mcad.benchmarks.peers import ClipTextTower
    from mcad.export.encoders import Towers

    cfg = CLIP_TINY_TEXT if tiny else CLIP_B32_TEXT
    name = "clip-tiny-text" if tiny else "clip-vit-b32-text"
    L, D = cfg["max_position_embeddings"], cfg["projection_dim"]
    ids = random_ids(len(texts), L, cfg["vocab_size"], CLIP_SOT, CLIP_EOT, 0, seed)
    torch.manual_seed(seed)
    module = ClipTextTower(cfg).eval()
    n_params = sum(p.numel() for p in module.parameters())
    towers = Towers(name, module, None, embed_dim=D, context_length=L, eot_id=CLIP_EOT)
    manifests, skipped = build_variants(cache / f"{name}-{cache_key(name, cfg, seed)}", runtimes, quants,
                                        calib_samples(ids, 0, "random-id"), towers=towers)
    return Subject(name, "peer", _made(manifests, runtimes, quants), ids=_save_ids(work / f"ids_{name}.npy", ids),
                   tokenizer=tokenizer, tokenizer_feeds_encoder=False, context_length=L, embed_dim=D,
                   params={"text": n_params}, source="transformers CLIPTextModelWithProjection, random weights",
                   notes=["random CLIP-vocabulary ids; tokenize timed with the run's tokenizer (no CLIP BPE offline)"],
                   skipped=skipped)


def mobilevit_subject(runtimes: list[str], quants: list[str], cache: Path = DEFAULT_CACHE, seed: int = 0,
                      tiny: bool = False) -> Subject:
    import torch

    from mcad.benchmarks.artifacts import build_variants, cache_key
    from mcad.benchmarks.peers import MobileViTTower
    from mcad.export.encoders import Towers

    cfg = MOBILEVIT_TINY if tiny else MOBILEVIT_SMALL
    name = "mobilevit-tiny" if tiny else "mobilevit-small"
    torch.manual_seed(seed)
    module = MobileViTTower(cfg).eval()
    S = cfg["image_size"]
    with torch.no_grad():
        D = int(module(torch.zeros(1, 3, S, S)).shape[-1])
    towers = Towers(name, None, module, embed_dim=D, image_size=S)
    manifests, skipped = build_variants(cache / f"{name}-{cache_key(name, cfg, seed)}", runtimes, quants,
                                        calib_samples(None, S, "no"), towers=towers)
    return Subject(name, "peer", _made(manifests, runtimes, quants), embed_dim=D, image_size=S,
                   params={"image": sum(p.numel() for p in module.parameters())},
                   source="transformers MobileViTModel, random weights (pooled 640-d, no projection)",
                   skipped=skipped)


# -- parity ----------------------------------------------------------------------------------------
PARITY_MARK = "PARITY FAILED"


def check_parity(subjects: list[Subject], allow: bool, gate: bool) -> None:
    """An export whose parity failed is refused before anything is timed: one line naming the failed
    artifacts, and how to bench it anyway (allow_failed_parity=1, which marks it). The gate never
    takes one, whatever the key says."""
    for s in subjects:
        if not s.parity_failed:
            continue
        files = sorted(s.parity_failed)
        where = ", ".join(sorted(set(s.parity_failed.values())))
        shown = ", ".join(files[:4]) + (f" and {len(files) - 4} more" if len(files) > 4 else "")
        if gate:
            fix = load_manifest(sorted(set(s.parity_failed.values()))[0]).rebuild_command()
            raise ValueError(f"{where}: parity failed for {shown}; the gate never passes an export whose parity "
                             f"failed (allow_failed_parity= does not apply to budget=gate): fix the export, then {fix}")
        if not allow:
            raise ValueError(f"{where}: parity failed for {shown} (see its 'parity' section); fix the export, or "
                             f"bench it anyway with allow_failed_parity=1 (its rows are marked {PARITY_MARK})")
        s.notes.insert(0, f"**{PARITY_MARK}**: {shown} missed the export's parity bars ({where}); benched "
                          "only because allow_failed_parity=1 asked")


def mark_parity(rows: list[dict], subjects: list[Subject]) -> list[str]:
    """Mark the rows of artifacts whose parity failed (`parity`: PARITY FAILED); the files marked."""
    failed = {(s.name, f) for s in subjects for f in s.parity_failed}
    for r in rows:
        if (r.get("subject"), r.get("file")) in failed:
            r["parity"] = PARITY_MARK
    return sorted(f for _, f in failed)


def marked_for_markdown(res: dict) -> dict:
    """The results as bench.md shows them: with parity failures, the title and every failed row's
    subject cell say PARITY FAILED (bench.json keeps the plain names and a `parity` key per row)."""
    if not res.get("parity_failed"):
        return res
    rows = [dict(r, subject=f"{r['subject']} ({PARITY_MARK})") if r.get("parity") else r for r in res["rows"]]
    return dict(res, rows=rows, run_name=f"{res.get('run_name', '')} ({PARITY_MARK}: "
                                         f"{', '.join(res['parity_failed'])})")
