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
    if config.get("type") not in kinds:
        raise ValueError(f"model config {config.get('name', '?')}: unknown type {config.get('type')!r} (dual, fusion)")
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
