"""The ranges of numeric keys and the rule for run names (mcad.config checks every override and
recipe value against them)."""
from __future__ import annotations

from typing import Any

# The range of a numeric key is declared by its last name, the same in every command and recipe
# (`lr`, `dual.lr` and `adapters.lr` are all learning rates): a value outside it is one line naming
# the key, at parse time, before any work. A command may check more (a minimum of 2, a choice).
POSITIVE = frozenset((
    "lr", "steps", "batch_size", "batch", "threads", "k", "rerank_k", "list_k", "neighbours", "tau", "tau_kd",
    "tau_f", "calib", "context_length", "vocab_size", "nlist", "nprobe", "m", "nbits", "M", "efConstruction",
    "efSearch", "image_size", "size", "captions_per_image", "distill_captions",
    "max_images", "max_samples", "cache_shard_images", "galleries", "iterations", "runs", "max_runs", "timeout",
    "build_timeout", "max_time"))
NON_NEGATIVE = frozenset((
    "workers", "seed", "warmup", "ckpt_every", "itc_warmup_steps", "weight_decay", "grad_clip", "alpha", "beta",
    "mu", "lam", "n_train", "n_val", "n_test", "n_distill", "parity_images", "queries", "rerank", "confirm",
    "min_time"))
FRACTION = frozenset(("web_partial", "web_wrong"))


def range_problem(leaf: str, value: Any) -> str | None:
    """Why `value` is outside the range its key's last name declares, or None (also for keys
    without a declared range and for values that are not numbers)."""
    if isinstance(value, (list, tuple)):
        return next((p for p in (range_problem(leaf, v) for v in value) if p), None)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    word = "an integer" if isinstance(value, int) else "a number"
    if value != value:  # NaN is in no range
        return f"must be {word}, not NaN"
    if leaf in POSITIVE and not value > 0:
        return "must be a positive integer" if isinstance(value, int) else "must be a positive number"
    if leaf in NON_NEGATIVE and not value >= 0:
        return f"must be {word} >= 0"
    if leaf in FRACTION and not 0 <= value <= 1:
        return "must be between 0 and 1"
    return None


def run_name_problem(text: str) -> str | None:
    """Why `text` cannot name a run: the run is the folder out=/name, so the name is a relative
    folder below out= (`mcad-student`, `ablation/mcad-s0`), neither empty nor leading out of it."""
    parts = [p for p in text.replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts:
        return "empty; a run's name is the folder it writes below out= (e.g. name=mcad-student)"
    if text.startswith("/") or ".." in parts:
        return "leaves out= (an absolute path or '..'); a run's name is a folder below out= (e.g. name=mcad-student)"
    return None
