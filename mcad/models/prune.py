"""Which of a trained model's layers, heads and channels a smaller model of the same architecture
keeps (weight inheritance, as in TinyCLIP): the rules, shared by the project's own towers
(mcad.distill.inherit) and by `transformers` CLIP models (mcad.models.clip_student).

Rules (each keeps the kept units in the teacher's order, so the student's weights are slices of
the teacher's, bit for bit):
- layers: `evenly_spaced(n, k)`: the first and the last of the teacher's n layers and the others
  evenly spaced between them (rounded half up). The first is the one layer trained on the raw
  embeddings the student keeps; the last is the one whose output the final norm and the
  projection were trained to read. One layer kept: the first.
- a transformer's residual channels (its width): every weight matrix, embedding and LayerNorm gain
  that reads or writes the residual stream gets one vote, split over the channels in proportion to
  the L1 mass it puts on each (so a large embedding table does not outvote a layer); the channels
  with the most votes are kept. Only the kept layers vote.
- attention heads: the L1 norm of the weights that read and write the head (its rows of the query,
  key and value projections and its columns of the output projection, over the kept channels).
  Where the student's heads are narrower than the teacher's, each kept head keeps its query/key
  dimensions by the L1 of their query and key rows (a pair makes one term of the attention logit)
  and its value dimensions by the L1 of the value row and the output column that carries it. The
  softmax scale then follows the student's head width: the logits change, which training absorbs.
- MLP hidden units and conv filters: the L1 norm of the weights that read and write the unit
  (Li et al., "Pruning Filters for Efficient ConvNets": the filter's L1 norm).
"""
from __future__ import annotations

import torch


def evenly_spaced(n: int, k: int) -> list[int]:
    """k of n layer indices: 0 and n-1 kept, the rest evenly spaced (rounded half up)."""
    if not 1 <= k <= n:
        raise ValueError(f"cannot keep {k} of {n} layers")
    if k == 1:
        return [0]
    return [(2 * j * (n - 1) + (k - 1)) // (2 * (k - 1)) for j in range(k)]


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores (ties: the lower index), in ascending index order."""
    order = torch.argsort(-scores.detach().double(), stable=True)[:k]
    return order.sort().values


def l1_along(t: torch.Tensor, axis: int) -> torch.Tensor:
    """L1 mass per index of `axis` (summed over every other axis)."""
    a = t.detach().double().abs()
    return a.sum(dim=[d for d in range(a.dim()) if d != axis % a.dim()]) if a.dim() > 1 else a


def residual_channels(voters: list[tuple[torch.Tensor, int]], k: int) -> torch.Tensor:
    """The k channels with the most votes; each (tensor, axis) votes with weight 1 split by L1 mass."""
    width = voters[0][0].shape[voters[0][1]]
    if k == width:
        return torch.arange(width)
    score = torch.zeros(width, dtype=torch.float64)
    for t, axis in voters:
        mass = l1_along(t, axis)
        score += mass / mass.sum().clamp_min(1e-30)
    return top_k(score, k)


# -- a transformer layer in neutral names -------------------------------------------------------------
# q_w/k_w/v_w [heads*head_dim, width] (+ _b), o_w [width, heads*head_dim], o_b, ln1_w/ln1_b, ln2_w/ln2_b,
# fc1_w [hidden, width], fc1_b, fc2_w [width, hidden], fc2_b
LAYER_VOTERS = (("ln1_w", 0), ("q_w", 1), ("k_w", 1), ("v_w", 1), ("o_w", 0), ("ln2_w", 0), ("fc1_w", 1),
                ("fc2_w", 0))


def layer_voters(layer: dict) -> list[tuple[torch.Tensor, int]]:
    return [(layer[name], axis) for name, axis in LAYER_VOTERS]


def attention_rows(layer: dict, heads: int, keep_heads: int, head_dim: int, R: torch.Tensor):
    """(query/key rows, value rows) of the teacher's projections that the student keeps."""
    d_t = layer["q_w"].shape[0] // heads
    qk = (l1_along(layer["q_w"][:, R], 0) + l1_along(layer["k_w"][:, R], 0)).view(heads, d_t)
    vo = (l1_along(layer["v_w"][:, R], 0) + l1_along(layer["o_w"][R, :], 1)).view(heads, d_t)
    kept = top_k((qk + vo).sum(dim=1), keep_heads)
    qk_rows = torch.cat([h * d_t + top_k(qk[h], head_dim) for h in kept.tolist()])
    v_rows = torch.cat([h * d_t + top_k(vo[h], head_dim) for h in kept.tolist()])
    return qk_rows, v_rows


def mlp_rows(layer: dict, hidden: int, R: torch.Tensor) -> torch.Tensor:
    return top_k(l1_along(layer["fc1_w"][:, R], 0) + l1_along(layer["fc2_w"][R, :], 1), hidden)


def slice_attention(layer: dict, R: torch.Tensor, heads: int, keep_heads: int, head_dim: int) -> dict:
    """The student's attention projections: the teacher's rows and columns at the kept channels and heads."""
    qk, v = attention_rows(layer, heads, keep_heads, head_dim, R)
    out = {"q_w": layer["q_w"][qk][:, R], "q_b": layer["q_b"][qk], "k_w": layer["k_w"][qk][:, R],
           "k_b": layer["k_b"][qk], "v_w": layer["v_w"][v][:, R], "v_b": layer["v_b"][v],
           "o_w": layer["o_w"][R][:, v], "o_b": layer["o_b"][R]}
    return {k: t.clone() for k, t in out.items()}


def slice_layer(layer: dict, R: torch.Tensor, heads: int, keep_heads: int, head_dim: int, hidden: int) -> dict:
    """The student's layer: the teacher's rows and columns at the kept channels, heads and units."""
    out = slice_attention(layer, R, heads, keep_heads, head_dim)
    m = mlp_rows(layer, hidden, R)
    out.update(fc1_w=layer["fc1_w"][m][:, R], fc1_b=layer["fc1_b"][m], fc2_w=layer["fc2_w"][R][:, m],
               fc2_b=layer["fc2_b"][R], **{ln: layer[ln][R] for ln in ("ln1_w", "ln1_b", "ln2_w", "ln2_b")})
    return {k: t.clone() for k, t in out.items()}


def shape_problem(what: str, teacher: dict, student: dict) -> str | None:
    """Why a student layer stack of `student` shape cannot be cut from `teacher`'s (None: it can).
    Shapes: layers, width, heads, hidden (MLP)."""
    for key, noun in (("layers", "layers"), ("width", "channels"), ("heads", "attention heads"),
                      ("hidden", "MLP hidden units")):
        if student[key] > teacher[key]:
            return (f"{what}: {student[key]} {noun} where the teacher has {teacher[key]} (a student keeps a subset "
                    f"of the teacher's {noun})")
    d_t, d_s = teacher["width"] // teacher["heads"], student["width"] // student["heads"]
    if d_s > d_t:
        need = -(-student["width"] // d_t)
        return (f"{what}: heads {d_s} wide (width {student['width']} / {student['heads']} heads) where the teacher's "
                f"are {d_t} wide (a head keeps a subset of one teacher head's dimensions): use at least {need} heads")
    return None
