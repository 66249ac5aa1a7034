"""`init=inherit`: a student that starts from its dual teacher's weights (TinyCLIP's weight
inheritance): fewer layers and, where the architecture allows, fewer channels, heads and MLP units,
every kept weight a slice of the teacher's, bit for bit; the teacher's token embedding, positions
and tokenizer kept (sliced to the kept width). The rules (which layers, channels, heads) are
mcad.models.prune's.

- The project's own teachers: a tower inherits from a teacher tower of the same type (transformer
  text tower; ViT; conv, plain or depthwise-separable alike). A conv stage keeps evenly spaced
  blocks (the first always: it changes stride and width) and, per block, the filters of largest L1
  norm over the kept input channels; BatchNorm statistics are sliced with them. An attention pool
  on a student whose teacher pools by average has no counterpart and starts from scratch, as a new
  head would. A tower of another type (a conv student of a ViT teacher, a separable student of a
  plain conv teacher) cannot inherit: one line naming the tower, both types and the fix; `towers=`
  names the towers to inherit, the others start from scratch (under the same seed as `scratch`).
- A `transformers` CLIPModel teacher: the student is itself a CLIPModel (mcad.models.clip_student).
"""
from __future__ import annotations

import inspect
from pathlib import Path

import torch
from torch import nn

from mcad.models.prune import (evenly_spaced, l1_along, layer_voters, residual_channels, shape_problem,
                               slice_attention, slice_layer, top_k)
from mcad.models.registry import _merge, build_model, model_config
from mcad.models.towers import ConvImageTower, TextTower, ViTImageTower

TOWERS = ("image", "text")


class InheritError(ValueError):
    pass


def inherit_student(student_cfg, teacher, towers=TOWERS, overrides: dict | None = None) -> nn.Module:
    """A student of `student_cfg` (a registry name or config; "clip" or a dict with type clip for a
    CLIPModel teacher) built from `teacher` (a loaded dual teacher, a transformers CLIPModel, an mcad
    checkpoint path or a CLIPModel folder). `towers`: which towers inherit; the rest, and anything
    with no counterpart in the teacher, keep their scratch initialisation (call under the seed a
    scratch student would be built with). The result's `inheritance` records what was kept."""
    from mcad.models import clip_student

    towers = _towers(towers)
    teacher = load_teacher(teacher)
    if clip_student.is_clip_teacher(teacher):
        return clip_student.inherit_clip(teacher, student_cfg, towers=towers, overrides=overrides)
    cfg = model_config(student_cfg, **(overrides or {})) if isinstance(student_cfg, str) \
        else _merge(student_cfg, overrides or {})
    name = cfg.get("name", "the student")
    if cfg.get("type") != "dual":
        raise InheritError(f"model={name}: a {cfg.get('type')} config; the mcad dual teacher {teacher_name(teacher)} "
                           f"gives a dual student (student-tiny, student-tiny-vit, student-mobile)")
    student = build_model(cfg)
    t_sd = {k: v.detach() for k, v in teacher.state_dict().items()}
    s_sd = student.state_dict()
    rec: dict = {"teacher": teacher_name(teacher), "towers": {}, "scratch": []}
    for tower in towers:
        check_types(tower, teacher, student, name)
    R = {}
    if "text" in towers:
        R["text"], rec["towers"]["text"] = inherit_stack(t_sd, s_sd, "text", teacher, student, f"{name}'s text tower")
    if "image" in towers:
        R["image"], rec["towers"]["image"] = inherit_image(t_sd, s_sd, teacher, student, name, rec["scratch"])
    if R:
        inherit_projections(t_sd, s_sd, R, rec)
    student.load_state_dict(s_sd)
    rec["scratch"] += [k for k in s_sd if not any(k.startswith(p) for p in _inherited_prefixes(R))]
    student.inheritance = rec
    return student


def student_overrides(model, dual, tokenizer, init: str = "scratch") -> dict:
    """What the recipe builds `model` with (create_model or inherit_student overrides): the dual
    teacher's tokenizer, image size and mean/std for an mcad student (registry.student_overrides);
    nothing for a CLIPModel student, which takes them from its teacher. model=clip where it cannot
    be built is one line, said before any work."""
    from mcad.models import clip_student
    from mcad.models.registry import student_overrides as mcad_overrides

    if not clip_student.is_clip_shape(model):
        return mcad_overrides(model, dual, tokenizer)
    if init != "inherit":
        raise InheritError("model=clip: a CLIPModel student is cut from its CLIPModel teacher; set init=inherit "
                           "(or a registry student, e.g. model=student-mobile, for init=scratch)")
    if not clip_student.is_clip_teacher(dual):
        raise InheritError(f"model=clip: cut from a transformers CLIPModel dual teacher (dual.source=hf-clip), and the "
                           f"dual teacher here is {teacher_name(dual)}; use model=student-tiny (or another registry "
                           f"student)")
    return {}


def _towers(towers) -> tuple[str, ...]:
    towers = tuple(t for t in (towers.split(",") if isinstance(towers, str) else towers) if t)
    bad = [t for t in towers if t not in TOWERS]
    if bad or not towers:
        raise InheritError(f"inherit.towers={','.join(towers)}: expected image, text or image,text")
    return towers


def _inherited_prefixes(R: dict) -> list[str]:
    return (["text.", "text_proj."] if "text" in R else []) + (["visual.", "image_proj."] if "image" in R else []) \
        + (["logit_scale"] if R else [])


def load_teacher(teacher):
    """A module as it is; a path: a CLIPModel folder (config.json), else an mcad dual checkpoint
    (a .safetensors file, or a folder holding dual.safetensors)."""
    if isinstance(teacher, nn.Module):
        return teacher
    from mcad.models import clip_student

    p = Path(teacher)
    if p.is_dir() and (p / "config.json").exists():
        return clip_student.load_clip_teacher(p)
    if p.is_dir() and (p / "dual.safetensors").exists():
        p = p / "dual.safetensors"
    from mcad.models.checkpoint import load_model

    return load_model(p, kind="dual", role="dual=")


def teacher_name(teacher) -> str:
    cfg = getattr(teacher, "config", None)
    return str(cfg.get("name", "?")) if isinstance(cfg, dict) else type(teacher).__name__


# -- tower types -------------------------------------------------------------------------------------
def tower_type(model, tower: str) -> str:
    module = model.text if tower == "text" else model.visual
    if isinstance(module, TextTower):
        return "transformer text tower"
    if isinstance(module, ViTImageTower):
        return "ViT"
    if isinstance(module, ConvImageTower):
        return "depthwise-separable conv" if conv_cfg(model)["separable"] else "plain conv"
    return type(module).__name__


def check_types(tower: str, teacher, student, name: str) -> None:
    tt, st = tower_type(teacher, tower), tower_type(student, tower)
    if tt == st:
        return
    other = "text" if tower == "image" else "image"
    hint = {"plain conv": " (image.type=conv image.separable=false)", "ViT": " (image.type=vit)",
            "depthwise-separable conv": " (image.type=conv image.separable=true)"}.get(tt, "")
    raise InheritError(f"{tower} tower: the teacher's ({teacher_name(teacher)}) is a {tt}, {name}'s a {st}: a {st} "
                       f"holds no subset of a {tt}'s weights; use init=scratch, a student whose {tower} tower is a "
                       f"{tt}{hint}, or inherit the {other} tower only (inherit.towers={other})")


def _defaults(cls) -> dict:
    return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def conv_cfg(model) -> dict:
    """A dual model's conv image tower as its config built it (the constructor's defaults filled in)."""
    return {**_defaults(ConvImageTower), **{k: v for k, v in model.config["image"].items() if k != "type"}}


# -- transformer stacks (text tower, ViT) ------------------------------------------------------------------
def block_shape(module) -> dict:
    b = module.blocks[0] if len(module.blocks) else None
    return {"layers": len(module.blocks), "width": module.width, "heads": b.attn.heads if b else 1,
            "hidden": b.mlp.fc1.out_features if b else 0}


def mcad_layer(sd: dict, p: str) -> dict:
    kv_w, kv_b = sd[p + "attn.kv.weight"], sd[p + "attn.kv.bias"]
    n = kv_w.shape[0] // 2
    return {"q_w": sd[p + "attn.q.weight"], "q_b": sd[p + "attn.q.bias"], "k_w": kv_w[:n], "k_b": kv_b[:n],
            "v_w": kv_w[n:], "v_b": kv_b[n:], "o_w": sd[p + "attn.out.weight"], "o_b": sd[p + "attn.out.bias"],
            "ln1_w": sd[p + "ln1.weight"], "ln1_b": sd[p + "ln1.bias"], "ln2_w": sd[p + "ln2.weight"],
            "ln2_b": sd[p + "ln2.bias"], "fc1_w": sd[p + "mlp.fc1.weight"], "fc1_b": sd[p + "mlp.fc1.bias"],
            "fc2_w": sd[p + "mlp.fc2.weight"], "fc2_b": sd[p + "mlp.fc2.bias"]}


def put_mcad_layer(sd: dict, p: str, layer: dict) -> None:
    names = {"q_w": "attn.q.weight", "q_b": "attn.q.bias", "o_w": "attn.out.weight", "o_b": "attn.out.bias",
             "ln1_w": "ln1.weight", "ln1_b": "ln1.bias", "ln2_w": "ln2.weight", "ln2_b": "ln2.bias",
             "fc1_w": "mlp.fc1.weight", "fc1_b": "mlp.fc1.bias", "fc2_w": "mlp.fc2.weight", "fc2_b": "mlp.fc2.bias"}
    for k, name in names.items():
        sd[p + name] = layer[k]
    sd[p + "attn.kv.weight"] = torch.cat([layer["k_w"], layer["v_w"]])
    sd[p + "attn.kv.bias"] = torch.cat([layer["k_b"], layer["v_b"]])


# per tower: (state-dict prefix, its embeddings with the axis that is the width, its final norm, its projection)
STACKS = {"text": ("text.", (("tok.weight", 1), ("pos", 2)), "ln", "text_proj.weight"),
          "image": ("visual.", (("patch.weight", 0), ("patch.bias", 0), ("cls", 2), ("pos", 2)), "ln",
                    "image_proj.weight")}


def inherit_stack(t_sd: dict, s_sd: dict, tower: str, teacher, student, what: str):
    """A transformer stack (text tower or ViT): kept layers, channels, heads and MLP units."""
    t_mod, s_mod = (teacher.text, student.text) if tower == "text" else (teacher.visual, student.visual)
    ts, ss = block_shape(t_mod), block_shape(s_mod)
    problem = shape_problem(what, ts, ss) or same_inputs_problem(tower, t_mod, s_mod, what)
    if problem:
        raise InheritError(problem)
    pre, embeds, ln, proj = STACKS[tower]
    layers = evenly_spaced(ts["layers"], ss["layers"]) if ss["layers"] else []
    kept = [mcad_layer(t_sd, f"{pre}blocks.{i}.") for i in layers]
    voters = [(t_sd[pre + e], ax) for e, ax in embeds if e != "patch.bias"] + \
        [v for layer in kept for v in layer_voters(layer)] + [(t_sd[f"{pre}{ln}.weight"], 0), (t_sd[proj], 1)]
    R = residual_channels(voters, ss["width"])
    for j, layer in enumerate(kept):
        put_mcad_layer(s_sd, f"{pre}blocks.{j}.", slice_layer(layer, R, ts["heads"], ss["heads"],
                                                               ss["width"] // ss["heads"], ss["hidden"]))
    for e, ax in embeds:
        s_sd[pre + e] = t_sd[pre + e].index_select(ax, R).clone()
    for part in ("weight", "bias"):
        s_sd[f"{pre}{ln}.{part}"] = t_sd[f"{pre}{ln}.{part}"][R].clone()
    return R, {"type": tower_type(teacher, tower), "layers": layers, "of_layers": ts["layers"], "width": [ss["width"], ts["width"]],
               "heads": [ss["heads"], ts["heads"]], "mlp_hidden": [ss["hidden"], ts["hidden"]]}


def same_inputs_problem(tower: str, t, s, what: str) -> str | None:
    """What a stack's embeddings need to be kept whole: the same vocabulary and context (text), the
    same patches and grid (ViT)."""
    if tower == "text":
        for key in ("vocab_size", "context_length", "eot_id", "pad_id"):
            if getattr(t, key) != getattr(s, key):
                return (f"{what}: text.{key} {getattr(s, key)} where the teacher's is {getattr(t, key)}: the student "
                        f"keeps its teacher's token embedding, positions and tokenizer (registry.student_overrides "
                        f"sizes it to the teacher's tokenizer)")
        return None
    tp, sp = t.patch.kernel_size[0], s.patch.kernel_size[0]
    if tp != sp or t.n_tokens != s.n_tokens:
        return (f"{what}: {sp} px patches on a {s.image_size} px image where the teacher cuts {tp} px patches on "
                f"{t.image_size} px: the student keeps the teacher's patch embedding and positions; use "
                f"image.patch_size={tp} image.image_size={t.image_size}")
    return None


# -- conv towers --------------------------------------------------------------------------------------------
def _units(cfg: dict) -> list[list[list[int]]]:
    """Body indices per stage, per block (one conv unit; two where separable: depthwise, pointwise)."""
    idx, n, stages = 1, 2 if cfg["separable"] else 1, []
    for d in cfg["depths"]:
        stages.append([list(range(idx + b * n, idx + (b + 1) * n)) for b in range(d)])
        idx += d * n
    return stages


def conv_problem(t: dict, s: dict, what: str) -> str | None:
    if len(s["widths"]) != len(t["widths"]):
        return (f"{what}: {len(s['widths'])} conv stages where the teacher has {len(t['widths'])} (each stage halves "
                f"the image: a student keeps the teacher's stages and their strides)")
    for i, (sw, tw, sd, td) in enumerate(zip(s["widths"], t["widths"], s["depths"], t["depths"])):
        if sw > tw or sd > td:
            return (f"{what}: stage {i} has width {sw}, depth {sd} where the teacher's has width {tw}, depth {td} "
                    f"(a student keeps a subset of the teacher's blocks and filters)")
    return None


def _conv_unit(t_sd, s_sd, tp: str, sp: str, I: torch.Tensor, keep_out: int | None) -> torch.Tensor:
    """One conv + BatchNorm: the filters of largest L1 over the kept inputs `I` (a depthwise conv,
    keep_out None, keeps `I` itself). Returns the kept output channels."""
    w = t_sd[tp + "0.weight"]
    O = I if keep_out is None else top_k(l1_along(w[:, I], 0), keep_out)
    s_sd[sp + "0.weight"] = (w[O] if keep_out is None else w[O][:, I]).clone()
    for k in ("weight", "bias", "running_mean", "running_var"):
        s_sd[f"{sp}1.{k}"] = t_sd[f"{tp}1.{k}"][O].clone()
    s_sd[sp + "1.num_batches_tracked"] = t_sd[tp + "1.num_batches_tracked"].clone()
    return O


def inherit_conv(t_sd: dict, s_sd: dict, teacher, student, what: str, scratch: list):
    t, s = conv_cfg(teacher), conv_cfg(student)
    t_mod, s_mod = teacher.visual, student.visual
    problem = conv_problem(t, s, what)
    if problem:
        raise InheritError(problem)
    kept_blocks = []
    I = _conv_unit(t_sd, s_sd, "visual.body.0.", "visual.body.0.", torch.arange(3), s["widths"][0])
    for t_stage, s_stage, width in zip(_units(t), _units(s), s["widths"]):
        blocks = evenly_spaced(len(t_stage), len(s_stage))
        kept_blocks.append(blocks)
        for b, s_units in zip(blocks, s_stage):
            for k, (tu, su) in enumerate(zip(t_stage[b], s_units)):
                depthwise = s["separable"] and k == 0
                I = _conv_unit(t_sd, s_sd, f"visual.body.{tu}.", f"visual.body.{su}.", I, None if depthwise else width)
    if t["pool"] == s["pool"] == "attn":
        if t_mod.n_tokens != s_mod.n_tokens:
            raise InheritError(f"{what}: its attention pool reads a {s_mod.grid}x{s_mod.grid} grid where the "
                               f"teacher's reads {t_mod.grid}x{t_mod.grid}: use image.image_size={t_mod.image_size}")
        _inherit_pool(t_sd, s_sd, I, t["heads"], s["heads"], what)
    elif s["pool"] == "attn":
        scratch += [k for k in s_sd if k.startswith(("visual.pos", "visual.pool_"))]
    return I, {"type": tower_type(teacher, "image"), "blocks": kept_blocks, "of_depths": list(t["depths"]),
               "widths": [list(s["widths"]), list(t["widths"])], "pool": [s["pool"], t["pool"]]}


def _inherit_pool(t_sd, s_sd, R: torch.Tensor, heads_t: int, heads_s: int, what: str) -> None:
    """The attention pool: one attention layer over the kept channels (its LayerNorm and positions sliced)."""
    p = "visual.pool_attn."
    n = t_sd[p + "kv.weight"].shape[0] // 2
    problem = shape_problem(f"{what}'s attention pool", {"layers": 1, "width": n, "heads": heads_t, "hidden": 0},
                            {"layers": 1, "width": len(R), "heads": heads_s, "hidden": 0})
    if problem:
        raise InheritError(problem)
    kv_w, kv_b = t_sd[p + "kv.weight"], t_sd[p + "kv.bias"]
    layer = {"q_w": t_sd[p + "q.weight"], "q_b": t_sd[p + "q.bias"], "k_w": kv_w[:n], "k_b": kv_b[:n],
             "v_w": kv_w[n:], "v_b": kv_b[n:], "o_w": t_sd[p + "out.weight"], "o_b": t_sd[p + "out.bias"]}
    a = slice_attention(layer, R, heads_t, heads_s, len(R) // heads_s)
    s_sd.update({p + "q.weight": a["q_w"], p + "q.bias": a["q_b"], p + "out.weight": a["o_w"], p + "out.bias": a["o_b"],
                 p + "kv.weight": torch.cat([a["k_w"], a["v_w"]]), p + "kv.bias": torch.cat([a["k_b"], a["v_b"]])})
    for k in ("weight", "bias"):
        s_sd["visual.pool_ln." + k] = t_sd["visual.pool_ln." + k][R].clone()
    s_sd["visual.pos"] = t_sd["visual.pos"][:, :, R].clone()


def inherit_image(t_sd, s_sd, teacher, student, name: str, scratch: list):
    what = f"{name}'s image tower"
    if isinstance(student.visual, ViTImageTower):
        return inherit_stack(t_sd, s_sd, "image", teacher, student, what)
    return inherit_conv(t_sd, s_sd, teacher, student, what, scratch)


# -- the joint space ------------------------------------------------------------------------------------------
def inherit_projections(t_sd: dict, s_sd: dict, R: dict, rec: dict) -> None:
    """Both projections keep the same rows of the joint embedding space (by the L1 votes of the
    inherited towers' projections) and the teacher's temperature."""
    keys = {"text": "text_proj.weight", "image": "image_proj.weight"}
    dim = s_sd["text_proj.weight"].shape[0]
    if dim > t_sd["text_proj.weight"].shape[0]:
        raise InheritError(f"embed_dim {dim} where the teacher's is {t_sd['text_proj.weight'].shape[0]} (a student "
                           f"keeps a subset of the teacher's embedding dimensions)")
    E = residual_channels([(t_sd[keys[t]], 0) for t in R], dim)
    for tower, cols in R.items():
        s_sd[keys[tower]] = t_sd[keys[tower]][E][:, cols].clone()
    s_sd["logit_scale"] = t_sd["logit_scale"].clone()
    rec["embed_dim"] = [dim, int(t_sd["text_proj.weight"].shape[0])]
