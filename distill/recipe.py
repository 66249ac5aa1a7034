"""`make student`: the MCAD recipe over mcad/configs/student.yaml, in the shape of a torchtune
recipe: `StudentRecipe.setup`, `.train`, `.evaluate_and_save`.

- setup: the teachers (`dual.*`, `fusion.*`: `runs/teachers` by default, or Hugging Face CLIP /
  BLIP-ITM folders; mcad.teacher_spec), the dual teacher's tokenizer and the data (`data.*`,
  mcad.data.spec); the teachers' outputs, from the teacher cache (`mcad cache`, `cache=`) when it
  exists and online (forward only, no gradient) otherwise (both give the same TeacherOutputs); the
  confuser batches; the fused-feature path only when λ > 0 (`distill.fused`: F's fused features and
  the fusion adapters); the student and its trainer.
- train: L_clip + α L_dist + β L_feat on confuser batches.
- evaluate_and_save: the test split, and the run folder (student.safetensors + config,
  tokenizer.json, metrics.json, train.log, report.md, manifest.json; a CLIPModel student also as
  student-hf/, the folder `transformers.CLIPModel.from_pretrained` loads with no mcad code).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mcad import distributed, preprocess, teacher_spec
from mcad.accelerator import resolve_device
from mcad.checks import STUDENT as STUDENT_COUNTS, require_counts
from mcad.config import load_command_config
from mcad.data import spec as data_spec
from mcad.data.spec import open_split
from mcad.data.stream import StepFeed
from mcad.data.unpaired import UNPAIRED_DEFAULTS, parse_unpaired
from mcad.distill.cache import TeacherCache, TeacherOutputs, candidate_lists, dual_neighbours
from mcad.distill.fused import fused_on, setup_fused
from mcad.distill.inherit import inherit_student, student_overrides
from mcad.distill.losses import (FUSED, WITHIN, clip_loss, distribution_loss, feature_loss, mcad_targets,
                                 modified_features, single_teacher_loss)
from mcad.distill.sampling import ConfuserBatches, caption_choice
from mcad.distill.teacher_outputs import Teachers, on_device
from mcad.logs import add_file_log
from mcad.distill.unpaired import UnpairedImagesOf, setup_unpaired
from mcad.distill.trainer import Trainer
from mcad.evaluate import evaluate_dual, image_keys
from mcad.io import atomic_write_text, write_json, write_manifest
from mcad.models.checkpoint import save_model
from mcad.models.clip_student import HF_FOLDER, save_run_hf
from mcad.models.registry import count_params, create_model
from mcad.preprocess import model_input, view_of
from mcad.retrieval import recall_table
from mcad.runs import run_dir, run_folder_lock
from mcad.teacher_spec import load_teachers

log = logging.getLogger("mcad.distill")
VARIANTS = ("none", "dual", "single", "mcad")
# config settings a variant never reads: the recipe zeroes the loss weights among them, and the
# ablation leaves them out when it decides whether a finished run can be reused
UNUSED = {"none": ("loss", "adapters", "cache", "unpaired"),
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


INITS = ("scratch", "inherit")  # the student's first weights: random, or cut from its dual teacher


def check_recipe(cfg: dict) -> None:
    """The recipe's counts and names, before any work: one line naming the key."""
    require_counts(cfg, STUDENT_COUNTS)
    if cfg["variant"] not in VARIANTS:
        raise ValueError(f"variant {cfg['variant']!r}: expected one of {', '.join(VARIANTS)}")
    if cfg["loss"].get("within", "order") not in WITHIN:
        raise ValueError(f"loss.within={cfg['loss']['within']!r}: expected one of {', '.join(WITHIN)}")
    if cfg.get("init", "scratch") not in INITS:
        raise ValueError(f"init={cfg['init']!r}: expected one of {', '.join(INITS)}")
    if cfg["loss"].get("fused", "matched") not in FUSED:
        raise ValueError(f"loss.fused={cfg['loss']['fused']!r}: expected one of {', '.join(FUSED)}")


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


# Keys added after runs were recorded, with the values that do what the recipe did before them:
# records leave them out at these values, so earlier runs still resume and the ablation still
# reuses them.
NEW_DEFAULTS = {"train_split": "train", "loss.fused": "matched", "init": "scratch", "inherit.towers": ["image", "text"],
                **{f"unpaired.{k}": v for k, v in UNPAIRED_DEFAULTS.items()}}


def without_new_defaults(cfg: dict) -> dict:
    out = json.loads(json.dumps(cfg, default=str))
    for key, value in NEW_DEFAULTS.items():
        top, _, sub = key.partition(".")
        holder, name = (out.get(top), sub) if sub else (out, top)
        if isinstance(holder, dict) and name in holder and holder[name] == value:
            holder.pop(name)
            if sub and not holder:  # a mapping all at its defaults (`unpaired:` off) is left out whole
                out.pop(top)
    return out


class StudentRecipe:
    """One student run: `setup()`, `train()`, `evaluate_and_save()` (see the module doc)."""

    def __init__(self, cfg: dict, progress: bool = True):
        check_recipe(cfg)
        self.cfg, self.progress = cfg, progress
        self.variant, self.seed = cfg["variant"], int(cfg["seed"])
        self.weights = loss_weights(self.variant, cfg["loss"])  # α, β, μ, λ as the variant reads them
        self.un = parse_unpaired(cfg.get("unpaired"))
        self.paired = self.un.paired  # the train split's pairs (false: the unpaired data alone)
        if not self.paired and self.variant == "none":
            raise ValueError("variant=none learns from labels only and unpaired.paired=false gives it none: set "
                             "variant=dual|single|mcad, or unpaired.paired=true")
        if not self.paired and fused_on(self.variant, self.weights["lam"]):
            raise ValueError(f"loss.lam={self.weights['lam']:g} with unpaired.paired=false: the fusion adapters are "
                             f"fitted on the train split's pairs; set loss.lam=0, or unpaired.paired=true")
        if self.paired:  # the labelled pairs and the test split must be two sets of rows
            data_spec.check_train_and_eval_files(cfg["data"], cfg["eval"]["split"])
        self.adapters = None  # the fusion adapters: only on the fused-feature path (λ > 0)
        self.unp = None  # the unpaired data (distill.unpaired.UnpairedData): only where `unpaired:` gives some
        self.cache, self.cache_dir = None, teacher_spec.cache_dir(cfg)

    # -- setup ---------------------------------------------------------------------------------------
    def setup(self) -> None:
        self._load_teachers_and_data()
        if self.paired:
            self._teacher_outputs()
            self.batches = ConfuserBatches(self.nb, int(self.cfg["batch_size"]), self.seed,
                                           group=int(self.cfg["neighbours"]) + 1)
            if fused_on(self.variant, self.weights["lam"]):
                self.teacher_out, self.adapters = setup_fused(self.cfg, self.teacher_out, self.cache, self.ids,
                                                              self.caps, len(self.pixels), self.batches, self.seed,
                                                              self.progress)
        if self.un.on and self.variant != "none":
            self._unpaired()
        elif self.un.on:
            log.info("unpaired data: not read by variant=none (labels only)")
        self._student()

    def _sync_batchnorm(self, device: torch.device) -> None:
        """Each process normalises its slice of the global batch: with BatchNorm (conv students) the
        N-process step equals the one-process step only if the statistics are synchronised, which
        torch does on GPUs alone (SyncBatchNorm); on CPUs the statistics stay per process, said once."""
        if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.student.modules()):
            return
        if device.type == "cuda":
            self.student = nn.SyncBatchNorm.convert_sync_batchnorm(self.student)
        elif distributed.is_main():
            log.warning("%s has BatchNorm and SyncBatchNorm needs GPUs: on CPU each of the %d processes normalises "
                        "its own slice of the batch (not the one-process step; a ViT student, or one process, is)",
                        self.cfg["model"], self.world)

    def _load_teachers_and_data(self) -> None:
        cfg, progress = self.cfg, self.progress
        self.data = data_spec.parse(cfg["data"])
        device = resolve_device(cfg.get("device"))
        self.rank, self.world = distributed.init(device)
        self.device = distributed.local_device(device)
        torch.set_num_threads(max(1, int(cfg.get("threads", 2)) // self.world))
        self.run = run_dir(cfg["out"], cfg["name"])
        self.run.mkdir(parents=True, exist_ok=True)
        add_file_log(self.run / "train.log")
        self.tset = load_teachers(cfg, self.device)
        self.student_over = student_overrides(cfg["model"], self.tset.dual, self.tset.tokenizer,  # said before any work
                                              init=cfg.get("init", "scratch"))
        self.view = view_of(self.tset.dual)  # the student sees images as its dual teacher does (size, resize rule)
        self.pixels = self.corpus = None
        if self.paired:
            self.pixels, self.corpus = open_split(self.data, cfg.get("train_split", "train"), self.view,
                                                  cfg.get("workers"), progress, split_key="train_split")
        self.test_px, self.test_c = open_split(self.data, cfg["eval"]["split"], self.view, cfg.get("workers"), progress,
                                               split_key="eval.split")
        tok = self.tset.tokenizer
        self.test_ids = tok.encode_batch(self.test_c.captions)
        if self.paired:
            self.ids = tok.encode_batch(self.corpus.captions)
            self.caps, self.keys = self.corpus.image_captions(), torch.as_tensor(image_keys(self.corpus))
        # what the run depends on besides its config: a partial checkpoint of other data or other
        # teachers (same paths, new contents) is not resumed
        self.inputs = {"data": self.pixels.key(self.corpus.captions) if self.paired else None,
                       "teachers": self.tset.hashes}

    def _teacher_outputs(self) -> None:
        """The cache where there is one (checked against the data and teachers), else online teachers;
        the candidate lists either way. Dual KD (μ = λ = 0) never reads F: online runs skip it."""
        cfg, tset = self.cfg, self.tset
        if self.variant != "none" and (self.cache_dir / "manifest.json").exists():
            self.cache = TeacherCache(self.cache_dir)
            self.cache.check(len(self.pixels), self.caps, teachers=tset.hashes, data=self.inputs["data"],
                             teachers_arg=str(self.cfg["teachers"]))
            if self.cache.neighbours.shape[1] != int(cfg["neighbours"]):
                raise ValueError(f"{self.cache_dir}: cache has {self.cache.neighbours.shape[1]} neighbours per image, "
                                 f"the config {cfg['neighbours']}: rebuild it or set "
                                 f"neighbours={self.cache.neighbours.shape[1]}")
            self.nb = self.cache.neighbours
            log.info("teachers: from the cache %s", self.cache_dir)
        else:
            self.nb = dual_neighbours(tset.dual, self.pixels, int(cfg["neighbours"]), self.keys.numpy())
            if self.variant != "none":
                log.info("teachers: online (no cache at %s; `mcad cache` makes one)", self.cache_dir)
        uses_f = self.variant == "single" or self.weights["mu"] > 0 or self.weights["lam"] > 0
        f_ids = tset.fusion_ids(self.corpus.captions) if self.cache is None and uses_f else None
        self.teacher_out = Teachers(tset.dual, tset.fusion, candidate_lists(self.nb), self.cache, with_fusion=uses_f,
                                    fusion_ids=f_ids, device=self.device, images=self.pixels)

    def _unpaired(self) -> None:
        """The unpaired data and its teachers' tables (distill.unpaired): cached under <cache>/unpaired,
        else computed here; F only where the variant reads it."""
        w = self.weights
        with_f = self.variant == "single" or w["mu"] > 0 or w["lam"] > 0
        self.unp = setup_unpaired(self.cfg, self.un, self.tset, self.view, self.cache_dir / "unpaired", with_f,
                                  fused_on(self.variant, w["lam"]), self.pixels,
                                  self.corpus.captions if self.paired else None, self.progress)
        self.inputs["unpaired"] = self.unp.key

    def _student(self) -> None:
        """The student (the same initialisation for every variant), the feature maps B_img, B_txt
        to the dual teacher's width, DDP under torchrun, and the resumable trainer."""
        cfg, device, dual = self.cfg, self.device, self.tset.dual
        torch.manual_seed(self.seed)  # inherit: what has no counterpart in the teacher starts as scratch would
        if cfg.get("init", "scratch") == "inherit":
            self.student = inherit_student(cfg["model"], dual, towers=tuple(cfg["inherit"]["towers"]),
                                           overrides=self.student_over).to(device)
            log.info("student inherited from the dual teacher: %s", self.student.inheritance.get("towers"))
        else:
            self.student = create_model(cfg["model"], **self.student_over).to(device)
        self.student.image_view = self.view
        self.proj = nn.ModuleDict({"img": nn.Linear(self.student.embed_dim, dual.embed_dim, bias=False),
                                   "txt": nn.Linear(self.student.embed_dim, dual.embed_dim, bias=False)}).to(device)
        self.forward = self.student
        if self.world > 1:
            self._sync_batchnorm(device)
            # unpaired only: no label term, so logit_scale gets no gradient and DDP must not wait for it
            self.forward = torch.nn.parallel.DistributedDataParallel(
                self.student, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=not self.paired)
        recipe = {k: v for k, v in comparable(cfg).items() if k not in ("threads", "seeds", "variants", "results",
                                                                       "name", "out")}
        self.trainer = Trainer({"student": self.student, "proj": self.proj}, cfg,
                               self.run / "student.ckpt.pt" if self.rank == 0 else None,
                               desc=f"student ({self.variant})" + (f" rank {self.rank}" if self.world > 1 else ""),
                               recipe={**recipe, "inputs": self.inputs})
        self.trainer.resume()

    # -- train ---------------------------------------------------------------------------------------
    def train(self) -> float:
        """Distill; the seconds it took."""
        steps = int(self.cfg["steps"])
        if self.paired:
            kd = self.weights["alpha"] > 0 or self.weights["beta"] > 0
            # the student's view (= the dual's) first, then what online teachers need besides
            self.feed = StepFeed([self.pixels] + self.teacher_out.feed_images[1:] if kd else [self.pixels],
                                 self.batches, steps)
            self.keys_d = self.keys.to(self.device)
        if self.unp is not None:
            self.unp_feed = StepFeed([self.unp.images], UnpairedImagesOf(self.unp.batches), steps)
        t0 = time.time()
        self.trainer.fit(self.loss, progress=self.progress and self.rank == 0)
        return time.time() - t0

    def loss(self, step: int):
        """(the step's loss, its terms for the log): L_clip + α L_dist + β L_feat on its confuser batch,
        plus weight · (α L_dist + β L_feat) on its unpaired batch (no label there, so no L_clip)."""
        parts, wt = [], self.weights
        if self.paired:
            idx = self.batches(step)
            cap = caption_choice(len(self.pixels), self.caps, self.seed, step, idx)
            batch = self.feed(step)
            parts.append((model_input(self.student, batch[0]), torch.as_tensor(self.ids[cap])))
        if self.unp is not None:
            img, txt = self.unp.batches(step)
            parts.append((model_input(self.student, self.unp_feed(step)[0]), torch.as_tensor(self.unp.ids[txt])))
        emb = self.encode(parts)
        loss, logs = self.paired_loss(emb[0], batch, idx, cap) if self.paired else (0.0, {})
        if self.unp is not None:
            tb = on_device(self.unp.outputs(img, txt), self.device)
            l_dist, l_feat = self.kd_terms(tb, emb[-1][0], emb[-1][1], "candidates")  # no matched pair: candidates
            loss = loss + self.un.weight * (wt["alpha"] * l_dist + wt["beta"] * l_feat)
            logs.update(u_dist=float(l_dist.detach()), u_feat=float(l_feat.detach()))
        return loss, logs

    def encode(self, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple]:
        """(u, w, scale) of each (pixels, ids) part: one student forward a step (one DDP forward) over
        this process's slice of every part, each part's embeddings gathered over the processes (the
        losses see whole batches)."""
        sls = [(distributed.local_slice(len(px)), distributed.local_slice(len(ids))) for px, ids in parts]
        px = torch.cat([p[a] for (p, _), (a, _) in zip(parts, sls)]).to(self.device)
        ids = torch.cat([t[b] for (_, t), (_, b) in zip(parts, sls)]).to(self.device)
        u, w, scale = self.forward(px, ids)
        out, i, j = [], 0, 0
        for a, b in sls:
            ni, nt = a.stop - a.start, b.stop - b.start
            out.append((distributed.gather(u[i:i + ni]), distributed.gather(w[j:j + nt]), scale))
            i, j = i + ni, j + nt
        return out

    def paired_loss(self, emb: tuple, batch: list, idx: np.ndarray, cap: np.ndarray):
        """L_clip + α L_dist + β L_feat of the confuser batch, and its terms."""
        u, w, scale = emb
        loss = clip_loss(u, w, scale, self.keys_d[idx])
        logs = {"clip": float(loss.detach())}
        if self.weights["alpha"] > 0 or self.weights["beta"] > 0:
            tb = self.teacher_out(batch, self.ids, idx, cap)
            l_dist, l_feat = self.kd_terms(tb, u, w, str(self.cfg["loss"].get("fused", "matched")))
            loss = loss + self.weights["alpha"] * l_dist + self.weights["beta"] * l_feat
            logs.update(dist=float(l_dist.detach()), feat=float(l_feat.detach()))
        return loss, logs

    def kd_terms(self, tb: TeacherOutputs, u: torch.Tensor, w: torch.Tensor, fused: str):
        """(L_dist, L_feat) of student embeddings u [images], w [texts] against the teachers' outputs
        for those images and texts: the (modified) teacher similarity distributions, both directions,
        and the (modified) teacher features."""
        L, wt = self.cfg["loss"], self.weights
        tau, tau_f, mu, lam = float(L["tau_kd"]), float(L["tau_f"]), wt["mu"], wt["lam"]
        ad = self.adapters
        v_m, t_m = modified_features(ad, tb, lam, fused) if ad is not None else (tb.v, tb.t)
        s = u @ w.T
        if self.variant == "single":
            l_dist = single_teacher_loss(s, tb.mask_i2t, tb.m_i2t, tb.mask_t2i, tb.m_t2i, tau, tau_f)
        else:
            mod = ad is not None and lam > 0
            tgt_i, tgt_t = mcad_targets(tb.v, tb.t, v_m if mod else None, t_m if mod else None, tb.mask_i2t,
                                        tb.m_i2t, tb.mask_t2i, tb.m_t2i, mu, str(L.get("within", "order")), tau, tau_f)
            l_dist = distribution_loss(s, tgt_i, tgt_t, tau)
        l_feat = feature_loss(self.proj["img"](u), self.proj["txt"](w), v_m, t_m) if wt["beta"] > 0 \
            else torch.zeros((), device=self.device)
        return l_dist, l_feat

    # -- evaluate and save ---------------------------------------------------------------------------
    def evaluate_and_save(self, train_s: float) -> dict:
        """The test split's recall of the student and its teachers; the run folder (rank 0 only)."""
        if not distributed.is_main():
            distributed.barrier()
            return {}
        cfg, tset, test_c = self.cfg, self.tset, self.test_c
        rows = {"student": evaluate_dual(self.student, self.test_px, self.test_ids, test_c.caption_to_image)[0]}
        known = teachers_own_rows(cfg, self.data, Path(cfg["teachers"]))
        rows["dual teacher"] = known.get("dual teacher") or \
            evaluate_dual(tset.dual, self.test_px, self.test_ids, test_c.caption_to_image)[0]
        rows.update({name: r for name, r in known.items() if name.startswith("fusion")})
        self.evaluated = data_spec.split_record(test_c, self.data)
        metrics = self.save(rows, train_s)
        print(data_spec.split_line(self.evaluated))
        print(recall_table(rows))
        distributed.barrier()
        return metrics

    def save(self, rows: dict, train_s: float) -> dict:
        """student.safetensors, tokenizer.json, metrics.json, report.md, manifest.json (and student-hf/)."""
        cfg, tset, run, variant, student = self.cfg, self.tset, self.run, self.variant, self.student
        save_model(student, run / "student.safetensors", extra={"variant": variant, "seed": self.seed},
                   tokenizer=tset.tokenizer)
        tset.tokenizer.save(run / "tokenizer.json")
        pre = preprocess.record(student, self.view)
        tr = self.trainer
        outputs = "none" if variant == "none" else ("cache " + str(self.cache_dir) if self.cache else
                                                    "online" if self.paired else "unpaired only")
        metrics = {"variant": variant, "seed": self.seed, "test": rows, "teacher_outputs": outputs,
                   "params": {"student": count_params(student), "dual_teacher": count_params(tset.dual),
                              "fusion_teacher": count_params(tset.fusion)},
                   "train_s": train_s,
                   "step_s": train_s / max(1, tr.steps - (tr.history[0]["step"] - 1 if tr.history else 0)),
                   "share_of_teacher_r1": {n: {d: rows["student"][f"{d}_r1"] / max(1e-9, r[f"{d}_r1"])
                                               for d in ("i2t", "t2i")} for n, r in rows.items() if n != "student"},
                   "teachers": tset.describe(), "data": self.data.describe(), "evaluated": self.evaluated,
                   "device": str(self.device),
                   "preprocess": pre, "config": cfg, **({"unpaired": self.unp.record} if self.unp else {})}
        write_json(run / "metrics.json", metrics)
        hf_files = save_run_hf(student, run, getattr(tset.dual, "name", None))  # a CLIPModel student: student-hf/ too
        atomic_write_text(run / "report.md", f"# {cfg['name']} ({variant}, seed {self.seed})\n\n{recall_table(rows)}\n\n"
                                             f"student {count_params(student):,} params; dual teacher "
                                             f"{count_params(tset.dual):,}\n")
        write_manifest(run / "manifest.json", kind="student-run", config=cfg,
                       files=[run / "student.safetensors", run / "tokenizer.json", run / "metrics.json", *hf_files],
                       teachers={"specs": tset.describe(), "sha256": tset.hashes}, preprocess=pre,
                       tokenizer={"file": "tokenizer.json", "kind": tset.tokenizer.kind, "of": tset.describe()["dual"]},
                       **({"student_hf": {"folder": HF_FOLDER, "loads_with": "transformers.CLIPModel.from_pretrained"}}
                          if hf_files else {}))
        return metrics


def distill(cfg: dict, progress: bool = True) -> dict:
    """Set up, train, evaluate and save one student run; its metrics ({} on processes other than rank 0)."""
    with run_folder_lock(run_dir(cfg["out"], cfg["name"]), "student"):  # one writer per run folder
        recipe = StudentRecipe(cfg, progress)
        recipe.setup()
        train_s = recipe.train()
        return recipe.evaluate_and_save(train_s)


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
