"""Model zoo: one small YAML file per architecture in `configs/`, registered by file name
(open_clip style). `create_model("student-tiny", text={"vocab_size": 300})` builds one."""
from __future__ import annotations

import copy
from pathlib import Path

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"


def list_models(kind: str | None = None) -> list[str]:
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    if kind is None:
        return names
    return [n for n in names if model_config(n)["type"] == kind]


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def model_config(name: str, **overrides) -> dict:
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.exists():
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(list_models())}")
    cfg = yaml.safe_load(path.read_text())
    cfg["name"] = name
    if cfg["type"] == "fusion" and isinstance(cfg.get("dual"), str):
        cfg["dual"] = model_config(cfg["dual"])
    return _merge(cfg, overrides)


def build_model(config: dict):
    from mcad.models.dual import DualEncoder
    from mcad.models.fusion import FusionModel

    kinds = {"dual": DualEncoder, "fusion": FusionModel}
    if config.get("type") == "clip":  # a transformers CLIPModel student (mcad.models.clip_student)
        from mcad.models.clip_student import CLIPStudent

        return CLIPStudent(config)
    if config.get("type") not in kinds:
        raise ValueError(f"model config {config.get('name', '?')}: unknown type {config.get('type')!r} (dual, fusion, clip)")
    return kinds[config["type"]](config)


def create_model(name_or_config: str | dict, **overrides):
    cfg = model_config(name_or_config, **overrides) if isinstance(name_or_config, str) \
        else _merge(name_or_config, overrides)
    return build_model(cfg)


def with_tokenizer(overrides: dict, tokenizer) -> dict:
    """Overrides that size a text tower to a tokenizer (vocab, context, special ids)."""
    text = {"vocab_size": tokenizer.vocab_size, "context_length": tokenizer.context_length,
            "eot_id": tokenizer.eot_id, "pad_id": tokenizer.pad_id}
    return _merge(overrides, {"text": text})


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def image_size_problem(config: dict, size: int) -> str | None:
    """Why a dual model of `config` cannot take `size` px images (None: it can). A conv tower halves
    the side once per stage and its attention pool is sized for the final grid; a ViT cuts patches."""
    img = config["image"]
    if img.get("type", "conv") == "vit":
        patch = int(img["patch_size"])
        return None if size % patch == 0 else f"its ViT cuts {patch} px patches: the side must be a multiple of {patch}"
    stride = 2 ** len(img["widths"])
    if size % stride == 0:
        return None
    return f"its {len(img['widths'])} conv stages halve the side each: it must be a multiple of {stride}"


def student_overrides(name: str, teacher, tokenizer) -> dict:
    """create_model overrides of a student distilled from `teacher`: the teacher's tokenizer, and its
    image size and mean/std where they differ from the model's own (the student sees the images the
    teacher sees; on the embedded default nothing differs and the student is built as before).
    An image size the student cannot take is one line naming the model and the fix."""
    cfg = model_config(name)
    over: dict = {}
    size = int(teacher.image_size)
    if int(cfg["image"].get("image_size", 64)) != size:
        problem = image_size_problem(cfg, size)
        if problem:
            fits = [n for n in list_models("dual") if n.startswith("student") and n != name
                    and image_size_problem(model_config(n), size) is None]
            raise ValueError(f"model={name}: cannot take the dual teacher's {size} px images ({problem}); use "
                             f"model={' or model='.join(fits) if fits else '<a student of another depth>'}, or a dual "
                             f"teacher of another image size")
        over["image"] = {"image_size": size}
    from mcad.data.images import DEFAULT_MEAN, DEFAULT_STD

    for key, default in (("image_mean", DEFAULT_MEAN), ("image_std", DEFAULT_STD)):
        want = [float(v) for v in getattr(teacher, key)]
        if want != [float(v) for v in cfg.get(key, default)]:
            over[key] = want
    return with_tokenizer(over, tokenizer)
