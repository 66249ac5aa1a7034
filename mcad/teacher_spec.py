"""The teacher spec: which dual-stream and which fusion teacher `mcad cache`, `student`, `ablation`
and `eval` use. The one place a spec becomes loaded teachers (through
`mcad.models.hf_teachers.load_teacher`).

  dual.source=mcad        dual.path=<teachers>/dual.safetensors (default: what `make teachers` trained)
  dual.source=hf-clip     dual.path=<CLIPModel save_pretrained folder, with its tokenizer files>
  fusion.source=mcad      fusion.path=<teachers>/fusion.safetensors
  fusion.source=hf-blip-itm  fusion.path=<BlipForImageTextRetrieval folder>

`dual=PATH` / `fusion=PATH` are short for the source the path shows (a folder's config.json names
CLIP or BLIP; anything else is an mcad checkpoint). The student takes the dual teacher's tokenizer;
the fusion teacher reads captions with its own (BLIP's BERT WordPiece: `fusion_ids`).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from mcad.io import sha256_file

log = logging.getLogger("mcad.teacher_spec")

ROLES = ("dual", "fusion")
SOURCES = {"dual": ("mcad", "hf-clip"), "fusion": ("mcad", "hf-blip-itm")}
MCAD_FILES = {"dual": "dual.safetensors", "fusion": "fusion.safetensors"}
TOKENIZER = "tokenizer.json"
TEACHER_DEFAULTS = {role: {"source": "mcad", "path": None} for role in ROLES}
HF_TYPES = {"clip": "hf-clip", "blip": "hf-blip-itm"}  # config.json model_type -> source


@dataclass(frozen=True)
class TeacherSpec:
    role: str
    source: str
    path: str | None  # None: the mcad default under the recipe's `teachers` folder

    @property
    def is_default(self) -> bool:
        return self.source == "mcad" and self.path is None

    def resolved(self, teachers: str | Path) -> Path:
        return Path(self.path) if self.path else Path(teachers) / MCAD_FILES[self.role]

    def describe(self, teachers: str | Path) -> str:
        return f"{self.source}:{self.resolved(teachers)}"


def parse(role: str, value: Any) -> TeacherSpec:
    """A recipe's `dual` / `fusion` mapping (or a path) -> a checked TeacherSpec."""
    if isinstance(value, TeacherSpec):
        return value
    if isinstance(value, (str, Path)):
        value = shorthand(str(value))
    if not isinstance(value, Mapping):
        raise ValueError(f"{role}: a teacher spec is {role}.source=... {role}.path=..., got {value!r}")
    unknown = sorted(set(value) - {"source", "path"})
    if unknown:
        raise ValueError(f"{role}.{unknown[0]}: unknown key of the teacher spec (valid: {role}.source, {role}.path)")
    source = str(value.get("source") or "mcad")
    if source not in SOURCES[role]:
        other = next((r for r in ROLES if source in SOURCES[r]), None)
        raise ValueError(f"{role}.source={source}: expected one of {', '.join(SOURCES[role])}"
                         + (f" ({source} is a {other} teacher: {other}.source={source})" if other else ""))
    path = value.get("path")
    if source != "mcad" and not path:
        raise ValueError(f"{role}.source={source}: needs {role}.path=<save_pretrained folder>")
    return TeacherSpec(role, source, str(path) if path else None)


def shorthand(value: str) -> dict[str, Any]:
    """`dual=PATH` / `fusion=PATH` as the source and path it stands for."""
    p = Path(value)
    if (p / "config.json").is_file():
        try:
            model_type = json.loads((p / "config.json").read_text(encoding="utf-8")).get("model_type")
        except (ValueError, UnicodeDecodeError):
            model_type = None
        if model_type in HF_TYPES:
            return {"source": HF_TYPES[model_type], "path": value}
    return {"source": "mcad", "path": value}


def specs(cfg: Mapping) -> dict[str, TeacherSpec]:
    return {role: parse(role, cfg.get(role) or TEACHER_DEFAULTS[role]) for role in ROLES}


def is_default(cfg: Mapping) -> bool:
    """Both teachers are the project's own, in the recipe's `teachers` folder (the embedded default)."""
    return all(s.is_default for s in specs(cfg).values())


# -- hashes: what a cache or a student was made from ------------------------------------------------
def _hf_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith("."))


def hashes(cfg: Mapping) -> dict[str, str]:
    """sha256 of every teacher file. The mcad teachers keep the keys caches recorded before specs
    (dual.safetensors, fusion.safetensors, tokenizer.json), so those caches stay valid; a model
    folder gives `<role>/<file>` for each of its files (weights, config, tokenizer, preprocessor)."""
    teachers = Path(cfg.get("teachers") or "runs/teachers")
    out: dict[str, str] = {}
    for role, spec in specs(cfg).items():
        path = spec.resolved(teachers)
        if spec.source == "mcad":
            out[MCAD_FILES[role]] = sha256_file(path)
            if role == "dual":
                out[TOKENIZER] = sha256_file(_mcad_tokenizer(path))
        else:
            from mcad.models.hf_teachers import resolve_folder

            folder = resolve_folder(path, spec.source)
            out.update({f"{role}/{f.name}": sha256_file(f) for f in _hf_files(folder)})
    return out


def _mcad_tokenizer(path: Path) -> Path:
    return (path if path.is_dir() else path.parent) / TOKENIZER


# -- loading -----------------------------------------------------------------------------------------
@dataclass
class LoadedTeachers:
    dual: Any
    fusion: Any
    tokenizer: Any                    # the dual teacher's: the student's
    fusion_tokenizer: Any | None      # None: the fusion teacher reads the dual's ids
    specs: dict[str, TeacherSpec]
    teachers: Path
    hashes: dict[str, str] = field(default_factory=dict)

    def fusion_ids(self, captions: list[str]) -> np.ndarray | None:
        """The fusion teacher's token ids of `captions`, or None where it reads the dual's."""
        return None if self.fusion_tokenizer is None else self.fusion_tokenizer.encode_batch(captions)

    def describe(self) -> dict[str, str]:
        return {role: s.describe(self.teachers) for role, s in self.specs.items()}


def check_default_files(teachers: Path) -> None:
    for f in (MCAD_FILES["dual"], MCAD_FILES["fusion"], TOKENIZER):
        if not (teachers / f).exists():
            raise FileNotFoundError(f"{teachers / f}: missing teacher file (run `make teachers` first)")


def load_one(spec: TeacherSpec, teachers: Path):
    """(frozen teacher, its tokenizer, the tokenizer's file) of one spec."""
    from mcad.models.checkpoint import check_tokenizer
    from mcad.models.hf_teachers import load_teacher

    path = spec.resolved(teachers)
    if spec.source == "mcad" and not path.exists():
        raise FileNotFoundError(f"{path}: no such {spec.role} teacher checkpoint (run `make teachers`, or set "
                                f"{spec.role}.path=<file>, or {spec.role}.source={SOURCES[spec.role][1]} "
                                f"{spec.role}.path=<folder>)")
    model = load_teacher({"source": spec.source, "path": str(path)}, role=spec.role)
    model.requires_grad_(False)
    tok = model.tokenizer
    tok_file = _mcad_tokenizer(path) if spec.source == "mcad" else path
    if spec.source == "mcad" and tok is not None:
        check_tokenizer(model.config, tok, path, tok_file)
    return model, tok, tok_file


def load_teachers(cfg: Mapping, device=None) -> LoadedTeachers:
    """Both teachers of a recipe (`teachers`, `dual`, `fusion` keys), frozen, placed on `device`
    (mcad.accelerator.place: on the CPU the models themselves)."""
    import torch

    from mcad.accelerator import place

    teachers = Path(cfg.get("teachers") or "runs/teachers")
    sp = specs(cfg)
    if all(s.is_default for s in sp.values()):
        check_default_files(teachers)
    dual, tok, tok_file = load_one(sp["dual"], teachers)
    if tok is None:
        raise FileNotFoundError(f"{tok_file}: no tokenizer beside the dual teacher {sp['dual'].resolved(teachers)} "
                                f"(the student takes the dual teacher's tokenizer; copy it there)")
    fusion, ftok, ftok_file = load_one(sp["fusion"], teachers)
    if ftok is None:  # an mcad fusion teacher reads what its towers, the dual's, read
        from mcad.models.checkpoint import check_tokenizer

        check_tokenizer(fusion.config, tok, sp["fusion"].resolved(teachers), tok_file)
        ftok, ftok_file = tok, tok_file
    # the same tokenizer file (the mcad default): the fusion teacher reads the dual's ids as before
    same = sp["fusion"].source == "mcad" and sp["dual"].source == "mcad" and \
        sha256_file(ftok_file) == sha256_file(tok_file)
    device = torch.device(device or "cpu")
    out = LoadedTeachers(place(dual, device), place(fusion, device), tok, None if same else ftok, sp, teachers,
                         hashes(cfg))
    log.info("dual teacher %s, fusion teacher %s%s", *out.describe().values(),
             "" if device.type == "cpu" else f" on {device}")
    return out


def cache_dir(cfg: Mapping) -> Path:
    """The teacher cache of a recipe: `cache=`; else <teachers>/cache for the project's own teachers
    (as before specs); else a folder under <out>/teacher-cache/ keyed by the teachers and the data, so
    `mcad cache`, `mcad student` and the ablation of one recipe meet there."""
    if cfg.get("cache"):
        return Path(cfg["cache"])
    teachers = Path(cfg.get("teachers") or "runs/teachers")
    if is_default(cfg):
        return teachers / "cache"
    import hashlib

    from mcad.data.spec import parse as parse_data

    what = {"teachers": {r: s.describe(teachers) for r, s in specs(cfg).items()},
            "data": parse_data(cfg.get("data")).describe()}
    key = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return Path(cfg.get("out") or "runs") / "teacher-cache" / key


def shorthands() -> dict:
    """`data=PATH`, `dual=PATH`, `fusion=PATH` for the commands that take both specs (mcad.config)."""
    from mcad.data.spec import shorthand as data_shorthand

    return {"data": data_shorthand, "dual": shorthand, "fusion": shorthand}
