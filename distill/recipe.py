"""`make student`: the MCAD recipe. One readable file + mcad/configs/student.yaml.

1. load the teachers (`dual.*`, `fusion.*`: `runs/teachers` by default, or Hugging Face CLIP / BLIP-ITM
   folders; mcad.teacher_spec), the dual teacher's tokenizer and the data (`data.*`, mcad.data.spec);
2. fit the fusion adapters A_img, A_txt (teachers frozen);
3. distill the student with L_clip + α L_dist + β L_feat on confuser batches;
4. evaluate, and write the run folder (student.safetensors + config, tokenizer.json,
   metrics.json, train.log, report.md, manifest.json).
Teachers come from the teacher cache (`mcad cache`, `cache=` in the config) when it exists, and
run online (forward only, no gradient) otherwise: both give the same TeacherOutputs."""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mcad import preprocess, teacher_spec
from mcad.accelerator import resolve_device
from mcad.config import load_command_config
from mcad.checks import STUDENT as STUDENT_COUNTS, require_counts
from mcad.data import spec as data_spec
from mcad.data.spec import open_split
from mcad.data.stream import StepFeed
from mcad.distill.cache import (TeacherCache, TeacherOutputs, candidate_lists, caption_table, dual_neighbours,
                                online_batch, online_candidate_features)
from mcad.distill.losses import (FUSED, NEG, WITHIN, FusionAdapters, distribution_loss, feature_loss, kl_rows,
                                 mcad_targets, modified_features, single_teacher_loss)
from mcad.evaluate import evaluate_dual, image_keys
from mcad.io import write_json, write_manifest
from mcad.distill.losses import clip_loss
from mcad.models.checkpoint import save_model
from mcad.models.registry import count_params, create_model, student_overrides
from mcad.preprocess import model_input, same_input, view_of
from mcad.retrieval import recall_table
from mcad.distill.sampling import ConfuserBatches, caption_choice
from mcad.teacher_spec import load_teachers
from mcad.distill.teachers import add_file_log
from mcad.distill.trainer import Trainer

log = logging.getLogger("mcad.distill")
VARIANTS = ("none", "dual", "single", "mcad")
# config settings a variant never reads: the recipe zeroes the loss weights among them, and the
# ablation leaves them out when it decides whether a finished run can be reused
UNUSED = {"none": ("loss", "adapters", "cache"),
          "dual": ("loss.mu", "loss.lam", "loss.tau_f", "loss.within", "loss.fused", "adapters"),
          "single": ("loss.beta", "loss.mu", "loss.lam", "loss.within", "loss.fused", "adapters"), "mcad": ()}
WEIGHTS = ("alpha", "beta", "mu", "lam")


def loss_weights(variant: str, loss_cfg: dict) -> dict[str, float]:
    """α, β, μ, λ as `variant` uses them: the ones it does not read are 0."""
    w = {k: float(loss_cfg[k]) for k in WEIGHTS}
    for key in UNUSED[variant]:
        top, _, sub = key.partition(".")
        if top == "loss":
            w.update({k: 0.0 for k in ([sub] if sub else WEIGHTS) if k in w})
    return w


class Teachers:
    """The teachers' outputs for a batch: from the cache, or by running them; on `device`.
    Online, a step's batch arrives decoded for `feed_images` (the dual teacher's view, which the
    student shares, and the fusion teacher's own where it differs)."""

    def __init__(self, dual, fusion, lists: np.ndarray, cache: TeacherCache | None, with_fusion: bool = True,
                 fusion_ids: np.ndarray | None = None, device: torch.device | None = None, images=None):
        self.dual, self.fusion, self.lists, self.cache = dual, fusion, lists, cache
        self.with_fusion = with_fusion
        self.fusion_ids = fusion_ids  # None: the fusion teacher reads the dual's ids (the mcad teachers)
        self.own_pixels = not same_input(dual, fusion)  # BLIP at 384 beside CLIP at 224, other mean/std
        self.device = device or torch.device("cpu")
        self.images = images  # mcad.data.stream.Images at the dual teacher's view
        self.f_images = images.as_view(view_of(fusion)) if images is not None else None  # F's (the same array: resized)

    @property
    def feed_images(self) -> list:
        """What each step must decode: the dual's view, and F's own where F runs online and sees another."""
        if self.cache is not None or self.images is None:
            return []
        extra = self.cache is None and self.with_fusion and self.own_pixels and self.f_images is not self.images
        return [self.images] + ([self.f_images] if extra else [])

    def __call__(self, batch: list, ids, idx: np.ndarray, cap: np.ndarray) -> TeacherOutputs:
        if self.cache is not None:
            return on_device(self.cache.batch(idx, cap), self.device)
        px = model_input(self.dual, batch[0])
        f_px = model_input(self.fusion, batch[-1]) if self.own_pixels and self.with_fusion else None
        f_ids = torch.as_tensor(self.fusion_ids[cap]) if self.fusion_ids is not None else None
        out = online_batch(self.dual, self.fusion, px, torch.as_tensor(ids[cap]), idx, self.lists, self.with_fusion,
                           f_px=f_px, f_ids=f_ids)
        return on_device(out, self.device)


class _Head:
    """The first `n` images of each step's batch (the adapters' batches; picklable for the loader)."""

    def __init__(self, batches, n: int):
        self.batches, self.n = batches, n

    def __call__(self, step: int) -> np.ndarray:
        return self.batches(step)[:self.n]


def on_device(tb: TeacherOutputs, device: torch.device) -> TeacherOutputs:
    """The batch's teacher outputs where the student is (the same tensors on the CPU)."""
    return dataclasses.replace(tb, **{f.name: getattr(tb, f.name).to(device) for f in dataclasses.fields(tb)})


def comparable(cfg: dict) -> dict:
    """The config as records compare it: the data as one value (`DataSpec.describe`: the synthetic
    root, as `data=` was before specs), the project's own teachers (the default) and the device left
    out, so a run of the embedded default records the recipe it recorded before and resumes (and the
    ablation reuses) runs made then."""
    out = without_new_defaults({k: v for k, v in cfg.items() if k not in ("device", "workers")})
    if "data" in out:
        out["data"] = data_spec.parse(out["data"]).describe()
    for role in ("dual", "fusion"):
        if role in out and teacher_spec.parse(role, out[role]).is_default:
            out.pop(role)
    return out


class WithCandidateFeatures:
    """Online teachers plus F's fused features over each image's and caption's candidate list
    (loss.fused=candidates; a cache holds them, distill.cache.online_candidate_features runs F)."""

    def __init__(self, teachers, cap_table: np.ndarray, tau_f: float, image_input, f_ids: np.ndarray):
        self.teachers, self.cap_table, self.tau_f = teachers, cap_table, tau_f
        self.image_input, self.f_ids = image_input, f_ids  # F's pixels of some images; all captions as F reads them

    def __getattr__(self, name):  # device, fusion, lists: the wrapped teachers'
        return getattr(self.teachers, name)

    @property
    def feed_images(self) -> list:
        return self.teachers.feed_images

    def __call__(self, batch: list, ids, idx: np.ndarray, cap: np.ndarray) -> TeacherOutputs:
        from dataclasses import replace

        out = self.teachers(batch, ids, idx, cap)
        h_img, h_txt = online_candidate_features(self.teachers.fusion, self.image_input, self.f_ids,
                                                 self.cap_table, self.teachers.lists, idx, cap, self.tau_f)
        return replace(out, h_img=h_img.to(out.v.device), h_txt=h_txt.to(out.v.device))


# Keys added after runs were recorded (issue 15), with the values that do what the recipe did
# before them: records leave them out at these values, so earlier runs still resume and the
# ablation still reuses them.
NEW_DEFAULTS = {"train_split": "train", "loss.fused": "matched"}


def without_new_defaults(cfg: dict) -> dict:
    out = json.loads(json.dumps(cfg, default=str))
    for key, value in NEW_DEFAULTS.items():
        top, _, sub = key.partition(".")
        holder, name = (out.get(top), sub) if sub else (out, top)
        if isinstance(holder, dict) and holder.get(name) == value:
            holder.pop(name)
    return out


def fit_adapters(cfg, teachers: Teachers, h_dim: int, dim: int, n_images: int, ids, caps, batches, seed,
                 progress=True) -> FusionAdapters:
    """A_img/A_txt such that ṽ_i·t_j over each row's candidates follows F's ITM judgement (and
    symmetrically)."""
    torch.manual_seed(seed + 5)
    ad = FusionAdapters(h_dim, dim).to(teachers.device)
    acfg = {"steps": int(cfg["adapters"]["steps"]), "lr": float(cfg["adapters"]["lr"]), "warmup": 10, "weight_decay": 0.0}
    tr = Trainer({"adapters": ad}, acfg, desc="fusion adapters")
    bs, tau, tau_f = int(cfg["adapters"]["batch_size"]), float(cfg["adapters"]["tau"]), float(cfg["loss"]["tau_f"])
    head = _Head(batches, bs)
    feed = StepFeed(teachers.feed_images, head, acfg["steps"])

    def loss_fn(step):
        idx = head(step)
        cap = caption_choice(n_images, caps, seed, step, idx)
        tb = teachers(feed(step), ids, idx, cap)
        v_m, t_m = modified_features(ad, tb, 1.0, str(cfg["loss"].get("fused", "matched")))
        s_half_i = (v_m @ tb.t.T).masked_fill(~tb.mask_i2t, NEG)   # only the image side modified
        s_half_t = (t_m @ tb.v.T).masked_fill(~tb.mask_t2i, NEG)   # only the text side modified
        loss = 0.5 * (kl_rows((tb.m_i2t / tau_f * tau).masked_fill(~tb.mask_i2t, NEG), s_half_i, tau) +
                      kl_rows((tb.m_t2i / tau_f * tau).masked_fill(~tb.mask_t2i, NEG), s_half_t, tau))
        return loss, {}

    tr.fit(loss_fn, progress=progress)
    ad.requires_grad_(False)
    return ad


def distill(cfg: dict, progress: bool = True) -> dict:
    require_counts(cfg, STUDENT_COUNTS)
    variant = cfg["variant"]
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r}: expected one of {', '.join(VARIANTS)}")
    if cfg["loss"].get("within", "order") not in WITHIN:
        raise ValueError(f"loss.within={cfg['loss']['within']!r}: expected one of {', '.join(WITHIN)}")
    if cfg["loss"].get("fused", "matched") not in FUSED:
        raise ValueError(f"loss.fused={cfg['loss']['fused']!r}: expected one of {', '.join(FUSED)}")
    from mcad import distributed

    data = data_spec.parse(cfg["data"])
    device = resolve_device(cfg.get("device"))
    rank, world = distributed.init(device)
    device = distributed.local_device(device)
    torch.set_num_threads(max(1, int(cfg.get("threads", 2)) // world))
    seed = int(cfg["seed"])
    teachers = Path(cfg["teachers"])
    run = Path(cfg["out"]) / cfg["name"]
    run.mkdir(parents=True, exist_ok=True)
    add_file_log(run / "train.log")
    tset = load_teachers(cfg, device)
    dual, fusion, tok = tset.dual, tset.fusion, tset.tokenizer
    student_over = student_overrides(cfg["model"], dual, tok)  # a size it cannot take: said before any work
    view = view_of(dual)  # the student sees images as its dual teacher does (size, resize rule)
    pixels, corpus = open_split(data, cfg.get("train_split", "train"), view, cfg.get("workers"), progress)
    test_px, test_c = open_split(data, cfg["eval"]["split"], view, cfg.get("workers"), progress)
    ids, test_ids = tok.encode_batch(corpus.captions), tok.encode_batch(test_c.captions)
    caps, keys = corpus.image_captions(), torch.as_tensor(image_keys(corpus))
    # what the run depends on besides its config: a partial checkpoint of other data or other
    # teachers (same paths, new contents) is not resumed
    inputs = {"data": pixels.key(corpus.captions), "teachers": tset.hashes}

    cache = None
    cache_dir = teacher_spec.cache_dir(cfg)
    if variant != "none" and (cache_dir / "manifest.json").exists():
        cache = TeacherCache(cache_dir)
        cache.check(len(pixels), caps, teachers=tset.hashes, data=inputs["data"])
        if cache.neighbours.shape[1] != int(cfg["neighbours"]):
            raise ValueError(f"{cache_dir}: cache has {cache.neighbours.shape[1]} neighbours per image, the config "
                             f"{cfg['neighbours']}: rebuild it or set neighbours={cache.neighbours.shape[1]}")
        nb = cache.neighbours
        log.info("teachers: from the cache %s", cache_dir)
    else:
        nb = dual_neighbours(dual, pixels, int(cfg["neighbours"]), keys.numpy())
        if variant != "none":
            log.info("teachers: online (no cache at %s; `mcad cache` makes one)", cache_dir)
    L = cfg["loss"]
    w = loss_weights(variant, L)
    alpha, beta, mu, lam = w["alpha"], w["beta"], w["mu"], w["lam"]
    # dual KD with μ = λ = 0 never reads F: online runs skip it
    uses_f = variant == "single" or mu > 0 or lam > 0
    teacher_out = Teachers(dual, fusion, candidate_lists(nb), cache, with_fusion=uses_f,
                           fusion_ids=tset.fusion_ids(corpus.captions) if cache is None and uses_f else None,
                           device=device, images=pixels)
    fused = str(L.get("fused", "matched"))
    if variant == "mcad" and lam > 0 and fused == "candidates":  # F over the candidate lists: cached, or run here
        if cache is not None:
            cache.check_fused(float(L["tau_f"]))
        else:
            f_ids = teacher_out.fusion_ids if teacher_out.fusion_ids is not None else ids
            f_images = teacher_out.f_images
            teacher_out = WithCandidateFeatures(teacher_out, caption_table(caps), float(L["tau_f"]),
                                                lambda j: model_input(fusion, f_images[j]), f_ids)
    batches = ConfuserBatches(nb, int(cfg["batch_size"]), seed, group=int(cfg["neighbours"]) + 1)
    adapters = fit_adapters(cfg, teacher_out, fusion.width, dual.embed_dim, len(pixels), ids, caps, batches, seed,
                            progress) \
        if variant == "mcad" and lam > 0 else None

    torch.manual_seed(seed)  # same student initialisation for every variant
    student = create_model(cfg["model"], **student_over).to(device)
    student.image_view = view
    proj = nn.ModuleDict({"img": nn.Linear(student.embed_dim, dual.embed_dim, bias=False),
                          "txt": nn.Linear(student.embed_dim, dual.embed_dim, bias=False)}).to(device)
    if world > 1:
        student_ddp = torch.nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None)
        forward = student_ddp
    else:
        forward = student
    tr = Trainer({"student": student, "proj": proj}, cfg, run / "student.ckpt.pt" if rank == 0 else None,
                 desc=f"student ({variant})" + (f" rank {rank}" if world > 1 else ""),
                 recipe={**{k: v for k, v in comparable(cfg).items()
                            if k not in ("threads", "seeds", "variants", "results", "name", "out")},
                         "inputs": inputs})
    tr.resume()
    tau, tau_f = float(L["tau_kd"]), float(L["tau_f"])
    within = str(L.get("within", "order"))
    keys_d = keys.to(device)
    # the student's view (= the dual's) first, then what online teachers need besides
    feed = StepFeed([pixels] + teacher_out.feed_images[1:] if alpha > 0 or beta > 0 else [pixels], batches,
                    int(cfg["steps"]))

    def loss_fn(step):
        idx = batches(step)
        cap = caption_choice(len(pixels), caps, seed, step, idx)
        batch = feed(step)
        px, ids_b = model_input(student, batch[0]).to(device), torch.as_tensor(ids[cap]).to(device)
        sl = distributed.local_slice(len(idx))  # this process encodes its slice; losses see all
        u, w, scale = forward(px[sl], ids_b[sl])
        u, w = distributed.gather(u), distributed.gather(w)
        loss = clip_loss(u, w, scale, keys_d[idx])
        logs = {"clip": float(loss.detach())}
        if alpha > 0 or beta > 0:
            tb = teacher_out(batch, ids, idx, cap)
            v_m, t_m = modified_features(adapters, tb, lam, fused) if adapters is not None else (tb.v, tb.t)
            s = u @ w.T
            if variant == "single":
                l_dist = single_teacher_loss(s, tb.mask_i2t, tb.m_i2t, tb.mask_t2i, tb.m_t2i, tau, tau_f)
            else:
                mod = adapters is not None and lam > 0
                tgt_i, tgt_t = mcad_targets(tb.v, tb.t, v_m if mod else None, t_m if mod else None,
                                            tb.mask_i2t, tb.m_i2t, tb.mask_t2i, tb.m_t2i, mu, within, tau, tau_f)
                l_dist = distribution_loss(s, tgt_i, tgt_t, tau)
            l_feat = feature_loss(proj["img"](u), proj["txt"](w), v_m, t_m) if beta > 0 else torch.zeros((), device=device)
            loss = loss + alpha * l_dist + beta * l_feat
            logs.update(dist=float(l_dist.detach()), feat=float(l_feat.detach()))
        return loss, logs

    t0 = time.time()
    tr.fit(loss_fn, progress=progress and rank == 0)
    train_s = time.time() - t0
    if not distributed.is_main():
        distributed.barrier()
        return {}

    rows = {}
    rows["student"], _ = evaluate_dual(student, test_px, test_ids, test_c.caption_to_image)
    known = teachers_own_rows(cfg, data, teachers)
    rows["dual teacher"] = known.get("dual teacher") or evaluate_dual(dual, test_px, test_ids, test_c.caption_to_image)[0]
    rows.update({name: r for name, r in known.items() if name.startswith("fusion")})
    save_model(student, run / "student.safetensors", extra={"variant": variant, "seed": seed})
    tok.save(run / "tokenizer.json")
    pre = preprocess.record(student, view)
    metrics = {"variant": variant, "seed": seed, "test": rows,
               "teacher_outputs": "none" if variant == "none" else ("cache " + str(cache_dir) if cache else "online"),
               "params": {"student": count_params(student), "dual_teacher": count_params(dual),
                          "fusion_teacher": count_params(fusion)},
               "train_s": train_s, "step_s": train_s / max(1, tr.steps - (tr.history[0]["step"] - 1 if tr.history else 0)),
               "share_of_teacher_r1": {n: {d: rows["student"][f"{d}_r1"] / max(1e-9, r[f"{d}_r1"]) for d in ("i2t", "t2i")}
                                       for n, r in rows.items() if n != "student"},
               "teachers": tset.describe(), "data": data.describe(), "device": str(device), "preprocess": pre,
               "config": cfg}
    write_json(run / "metrics.json", metrics)
    table = recall_table(rows)
    (run / "report.md").write_text(f"# {cfg['name']} ({variant}, seed {seed})\n\n{table}\n\n"
                                   f"student {count_params(student):,} params; dual teacher {count_params(dual):,}\n")
    write_manifest(run / "manifest.json", kind="student-run", config=cfg,
                   files=[run / "student.safetensors", run / "tokenizer.json", run / "metrics.json"],
                   teachers={"specs": tset.describe(), "sha256": tset.hashes}, preprocess=pre,
                   tokenizer={"file": "tokenizer.json", "kind": tok.kind, "of": tset.describe()["dual"]})
    print(table)
    distributed.barrier()
    return metrics


def teachers_own_rows(cfg: dict, data: data_spec.DataSpec, teachers: Path) -> dict:
    """The project's teachers evaluated themselves on this test split (`make teachers` writes
    metrics.json): reused rather than redone per run, only where they are the run's teachers and
    were evaluated on the run's data."""
    tm = teachers / "metrics.json"
    if not (tm.exists() and cfg["eval"]["split"] == "test" and teacher_spec.is_default(cfg)):
        return {}
    m = json.loads(tm.read_text())
    try:
        same = data_spec.parse((m.get("config") or {}).get("data") or data_spec.DEFAULT_SYNTH_ROOT).describe() \
            == data.describe()
    except ValueError:
        same = False
    return m.get("test", {}) if same else {}


def main(argv: list[str]) -> int:
    cfg = load_command_config(argv, "student", shorthands=teacher_spec.shorthands())  # `mcad student [recipe] key=value ...`, checked against the recipe
    distill(cfg)
    return 0


if __name__ == "__main__":  # python -m: what the `mcad` command runs, for callers below the CLI (benchmarks)
    import sys

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main(sys.argv[1:]))
