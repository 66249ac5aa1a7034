"""A student that is itself a `transformers.CLIPModel`, cut from a CLIPModel teacher (weight
inheritance: fewer layers, optionally fewer channels, heads and MLP units, by mcad.models.prune's
rules), trained and exported like mcad's own students, and saved as a `save_pretrained` folder with
its teacher's tokenizer and image processor files, which `transformers` loads with no mcad code.

`CLIPStudent` wraps the CLIPModel with the DualEncoder interface the recipe, evaluation and export
use (`encode_image`, `encode_text`, `forward`, `image_encoder()`, `text_encoder()`, `.text.eot_id`,
...); its config (`type: clip`, the CLIPModel's config inside) travels in the mcad checkpoint, so
`mcad.models.checkpoint.load_model` rebuilds it (registry.build_model).

Student shape (`student_cfg`): "clip" (half of each tower's layers, rounded up, the teacher's
widths) or `{"type": "clip", "image": {...}, "text": {...}, "embed_dim": E}` with per tower
`layers`, `width`, `heads`, `mlp` (intermediate size); a key left out keeps the teacher's value.
"""
from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from mcad.models.layers import l2_normalize
from mcad.models.prune import evenly_spaced, layer_voters, residual_channels, shape_problem, slice_layer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "added_tokens.json")
# neutral layer names (mcad.models.prune) -> a CLIPEncoderLayer's parameters
HF_LAYER = {"q_w": "self_attn.q_proj.weight", "q_b": "self_attn.q_proj.bias", "k_w": "self_attn.k_proj.weight",
            "k_b": "self_attn.k_proj.bias", "v_w": "self_attn.v_proj.weight", "v_b": "self_attn.v_proj.bias",
            "o_w": "self_attn.out_proj.weight", "o_b": "self_attn.out_proj.bias", "ln1_w": "layer_norm1.weight",
            "ln1_b": "layer_norm1.bias", "ln2_w": "layer_norm2.weight", "ln2_b": "layer_norm2.bias",
            "fc1_w": "mlp.fc1.weight", "fc1_b": "mlp.fc1.bias", "fc2_w": "mlp.fc2.weight", "fc2_b": "mlp.fc2.bias"}
# per tower: its prefix, its config key, its embeddings (with the axis that is the width), its norms, its projection
STACKS = {"image": ("vision_model.", "vision_config", (("embeddings.class_embedding", 0),
                    ("embeddings.patch_embedding.weight", 0), ("embeddings.position_embedding.weight", 1)),
                    ("pre_layrnorm", "post_layernorm"), "visual_projection.weight"),
          "text": ("text_model.", "text_config", (("embeddings.token_embedding.weight", 1),
                   ("embeddings.position_embedding.weight", 1)), ("final_layer_norm",), "text_projection.weight")}
HF_FOLDER = "student-hf"  # a run's CLIPModel student as transformers' own folder (save_run_hf)
SHAPE_KEYS = {"layers": "num_hidden_layers", "width": "hidden_size", "heads": "num_attention_heads",
              "mlp": "intermediate_size"}


class _Pooled(nn.Module):
    """A CLIP tower's pooled output: the text model's at the first <eot>, the vision model's [CLS]."""

    def __init__(self, model: nn.Module, arg: str, eot_id: int | None = None):
        super().__init__()
        self.m, self.arg, self.eot_id = model, arg, eot_id

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m(**{self.arg: x}).pooler_output


class _Encoder(nn.Module):
    """The shipped encoder's contract (mcad.export.encoders): a tower (.text or .visual) and .proj."""

    def __init__(self, tower: nn.Module, proj: nn.Module, role: str):
        super().__init__()
        setattr(self, role, tower)
        self.proj, self.role = proj, role

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return l2_normalize(self.proj(getattr(self, self.role)(x)))


class CLIPStudent(nn.Module):
    kind = "dual"

    def __init__(self, config: dict):
        super().__init__()
        from transformers import CLIPConfig, CLIPModel

        self.config = config
        self.hf = CLIPModel(CLIPConfig.from_dict(copy.deepcopy(config["hf"])))
        self.embed_dim = int(config["embed_dim"])
        self.image_size = int(config["image"]["image_size"])
        self.context_length = int(config["text"]["context_length"])
        self.image_mean, self.image_std = tuple(config["image_mean"]), tuple(config["image_std"])
        self.eot_id = int(config["text"]["eot_id"])
        eos = int(config["hf"]["text_config"]["eos_token_id"])
        if eos not in (2, self.eot_id):  # 2: CLIP's original config, which pools at the largest id (<eot>)
            raise ValueError(f"clip student {config.get('name')}: text_config.eos_token_id {eos} is not the "
                             f"tokenizer's <eot> {self.eot_id}: the pooled feature would be read at the wrong token")

    @property
    def text(self) -> nn.Module:
        return _Pooled(self.hf.text_model, "input_ids", self.eot_id)

    @property
    def visual(self) -> nn.Module:
        return _Pooled(self.hf.vision_model, "pixel_values")

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.hf.logit_scale

    def encode_image(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.hf.visual_projection(self.visual(pixels))
        return l2_normalize(x) if normalize else x

    def encode_text(self, ids: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.hf.text_projection(self.text(ids))
        return l2_normalize(x) if normalize else x

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor):
        return self.encode_image(pixels), self.encode_text(ids), self.hf.logit_scale.exp().clamp(max=100.0)

    def image_encoder(self) -> nn.Module:
        return _Encoder(self.visual, self.hf.visual_projection, "visual")

    def text_encoder(self) -> nn.Module:
        return _Encoder(self.text, self.hf.text_projection, "text")


# -- teachers ------------------------------------------------------------------------------------------
def is_clip_teacher(teacher) -> bool:
    return type(teacher).__name__ in ("CLIPTeacher", "CLIPModel")


def is_clip_shape(model) -> bool:
    """Whether a recipe's `model` names a CLIPModel student ("clip", or a shape of type clip)."""
    return model == "clip" or (isinstance(model, dict) and model.get("type") == "clip")


def check_tokenizer_files(folder: Path) -> None:
    folder = Path(folder)
    if (folder / "tokenizer.json").exists() or ((folder / "vocab.json").exists() and (folder / "merges.txt").exists()):
        return
    raise FileNotFoundError(f"{folder}: a CLIPModel teacher without its tokenizer files (tokenizer.json, or vocab.json + "
                            f"merges.txt): an inherited student keeps its teacher's tokenizer; save it there "
                            f"(CLIPTokenizer.from_pretrained(<repo>).save_pretrained('{folder}'))")


def load_clip_teacher(folder):
    from mcad.models.hf_teachers import CLIPTeacher, resolve_folder

    check_tokenizer_files(resolve_folder(folder, "hf-clip"))
    return CLIPTeacher.from_pretrained(folder)


def as_clip_teacher(teacher):
    """A CLIPTeacher as it is; a bare transformers CLIPModel with the tokenizer and image processor
    of the folder it was loaded from."""
    if type(teacher).__name__ == "CLIPTeacher":
        return teacher
    folder = getattr(teacher.config, "_name_or_path", "") or ""
    if not folder or not Path(folder).is_dir():
        raise ValueError("a CLIPModel teacher in memory with no folder it was loaded from: give its save_pretrained "
                         "folder (with its tokenizer files) instead")
    check_tokenizer_files(Path(folder))
    from mcad.models.hf_teachers import CLIPTeacher

    t = CLIPTeacher.from_pretrained(folder)
    return CLIPTeacher(teacher, t.tokenizer, t.image_mean, t.image_std, t.image_size, t.resize_size, name=str(folder))


# -- the student's shape -------------------------------------------------------------------------------
def tower_shape(sub: dict) -> dict:
    return {"layers": int(sub["num_hidden_layers"]), "width": int(sub["hidden_size"]),
            "heads": int(sub["num_attention_heads"]), "hidden": int(sub["intermediate_size"])}


def student_hf_config(teacher_cfg: dict, student_cfg, teacher_name: str) -> dict:
    """The student CLIPModel's config: the teacher's with the shape's layers and widths."""
    shape = {} if student_cfg is None or student_cfg == "clip" else student_cfg
    if not isinstance(shape, dict) or shape.get("type", "clip") != "clip":
        name = shape.get("name", "?") if isinstance(shape, dict) else shape
        raise ValueError(f"image tower: the teacher ({teacher_name}) is a transformers CLIPModel (ViT and CLIP text "
                         f"transformer), model={name} an mcad dual encoder: it holds no subset of a CLIPModel's weights; "
                         f"use init=scratch, or model=clip (a CLIPModel student cut from the teacher)")
    unknown = set(shape) - {"type", "name", "image", "text", "embed_dim"} \
        | {f"{t}.{k}" for t in ("image", "text") for k in (shape.get(t) or {}) if k not in SHAPE_KEYS}
    if unknown:
        raise ValueError(f"clip student shape: unknown key {sorted(unknown)[0]} (image/text: {', '.join(SHAPE_KEYS)}; "
                         f"embed_dim)")
    out = copy.deepcopy(teacher_cfg)
    for key in ("_name_or_path", "transformers_version"):
        out.pop(key, None)
    for tower, (_, ckey, *_rest) in STACKS.items():
        sub, given = out[ckey], shape.get(tower) or {}
        sub.pop("_name_or_path", None)
        sub["num_hidden_layers"] = -(-int(sub["num_hidden_layers"]) // 2)
        sub.update({SHAPE_KEYS[k]: int(v) for k, v in given.items()})
        problem = shape_problem(f"{tower} tower", tower_shape(teacher_cfg[ckey]), tower_shape(sub))
        if problem or sub["hidden_size"] % sub["num_attention_heads"]:
            raise ValueError(problem or f"{tower} tower: width {sub['hidden_size']} is not divisible by "
                                        f"{sub['num_attention_heads']} heads")
    dim = int(shape.get("embed_dim") or out["projection_dim"])
    if dim > int(out["projection_dim"]):
        raise ValueError(f"embed_dim {dim} where the teacher's is {out['projection_dim']} (a student keeps a subset of "
                         f"the teacher's embedding dimensions)")
    out["projection_dim"] = out["text_config"]["projection_dim"] = out["vision_config"]["projection_dim"] = dim
    return out


def student_config(hf_cfg: dict, teacher, name: str = "clip-student") -> dict:
    tok = teacher.tokenizer
    return {"type": "clip", "name": name, "embed_dim": int(hf_cfg["projection_dim"]), "hf": hf_cfg,
            "image": {"type": "clip-vit", "image_size": int(teacher.image_size)},
            "text": {"vocab_size": int(tok.vocab_size), "context_length": int(teacher.context_length),
                     "eot_id": int(tok.eot_id), "pad_id": int(tok.pad_id)},
            "image_mean": [float(v) for v in teacher.image_mean], "image_std": [float(v) for v in teacher.image_std]}


# -- inheritance ---------------------------------------------------------------------------------------
def hf_layer(sd: dict, prefix: str) -> dict:
    return {k: sd[prefix + name] for k, name in HF_LAYER.items()}


def inherit_clip(teacher, student_cfg="clip", towers=("image", "text"), overrides=None) -> CLIPStudent:
    """A CLIPStudent cut from a CLIPModel teacher (a CLIPTeacher or a CLIPModel loaded from its
    folder). `overrides` (the recipe's image size and tokenizer for mcad students) are the teacher's
    own here and are not read. Towers not in `towers` keep transformers' initialisation."""
    teacher = as_clip_teacher(teacher)
    t_cfg = teacher.hf.config.to_dict()
    student = CLIPStudent(student_config(student_hf_config(t_cfg, student_cfg, teacher.name), teacher))
    t_sd = {k: v.detach() for k, v in teacher.hf.state_dict().items()}
    s_sd = student.hf.state_dict()
    rec: dict = {"teacher": teacher.name, "towers": {}}
    R = {}
    for tower in towers:
        pre, ckey, embeds, norms, proj = STACKS[tower]
        ts, ss = tower_shape(t_cfg[ckey]), tower_shape(student.config["hf"][ckey])
        layers = evenly_spaced(ts["layers"], ss["layers"])
        kept = [hf_layer(t_sd, f"{pre}encoder.layers.{i}.") for i in layers]
        voters = [(t_sd[pre + e], ax) for e, ax in embeds] + [v for layer in kept for v in layer_voters(layer)] + \
            [(t_sd[f"{pre}{n}.weight"], 0) for n in norms] + [(t_sd[proj], 1)]
        R[tower] = residual_channels(voters, ss["width"])
        for j, layer in enumerate(kept):
            out = slice_layer(layer, R[tower], ts["heads"], ss["heads"], ss["width"] // ss["heads"], ss["hidden"])
            s_sd.update({f"{pre}encoder.layers.{j}.{HF_LAYER[k]}": v for k, v in out.items()})
        for e, ax in embeds:
            s_sd[pre + e] = t_sd[pre + e].index_select(ax, R[tower]).clone()
        for n in norms:
            for part in ("weight", "bias"):
                s_sd[f"{pre}{n}.{part}"] = t_sd[f"{pre}{n}.{part}"][R[tower]].clone()
        rec["towers"][tower] = {"type": "transformers CLIP", "layers": layers, "of_layers": ts["layers"],
                                "width": [ss["width"], ts["width"]], "heads": [ss["heads"], ts["heads"]],
                                "mlp_hidden": [ss["hidden"], ts["hidden"]]}
    E = residual_channels([(t_sd[STACKS[t][4]], 0) for t in R], student.embed_dim)
    for tower, cols in R.items():
        s_sd[STACKS[tower][4]] = t_sd[STACKS[tower][4]][E][:, cols].clone()
    s_sd["logit_scale"] = t_sd["logit_scale"].clone()
    student.hf.load_state_dict(s_sd)
    rec["embed_dim"] = [student.embed_dim, int(t_cfg["projection_dim"])]
    student.inheritance = rec
    student.teacher_folder = teacher.name
    return student


# -- the folder transformers loads -----------------------------------------------------------------------
def save_hf_folder(student: CLIPStudent, folder, tokenizer_from=None) -> Path:
    """`folder`: the student's save_pretrained files, its teacher's tokenizer files and image
    processor config (`tokenizer_from`: the teacher's folder; default: the one it was cut from).
    Written into a temp folder beside it, every file synced, then renamed into place (a folder
    already there is moved aside first and removed after), so `folder` is never half-written."""
    src = Path(tokenizer_from if tokenizer_from is not None else getattr(student, "teacher_folder", ""))
    check_tokenizer_files(src)
    folder = Path(folder)
    tmp, old = (folder.with_name(f".{folder.name}.{tag}-{os.getpid()}") for tag in ("tmp", "old"))
    for p in (tmp, old):
        shutil.rmtree(p, ignore_errors=True)
    student.hf.save_pretrained(str(tmp))
    for name in TOKENIZER_FILES + ("preprocessor_config.json", "processor_config.json"):
        if (src / name).exists():
            shutil.copyfile(src / name, tmp / name)
    for f in tmp.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def save_run_hf(student, run, teacher) -> list[Path]:
    """A run's CLIPModel student (model=clip, cut from a transformers CLIPModel teacher) also as
    <run>/student-hf/, for users who load it with transformers alone; `teacher`: the teacher's folder
    or a repo id in the local HF cache (its tokenizer and image processor files go with it). The files
    written, for the run's manifest; [] for any other student."""
    if not isinstance(student, CLIPStudent):
        return []
    from mcad.models.hf_teachers import resolve_folder

    folder = save_hf_folder(student, Path(run) / HF_FOLDER, tokenizer_from=resolve_folder(teacher, "hf-clip"))
    return sorted(p for p in folder.iterdir() if p.is_file())
