"""Numbers checked at each command's boundary: a count that makes no sense (`steps=-5`,
`n_train=-4`) is one line naming the key, before any work, never a run that trains nothing and
exits 0. (Types and unknown keys are the parser's, `mcad.config`; this is about ranges.)"""
from __future__ import annotations

import logging
from typing import Any, Mapping

from mcad.config import get

_MISSING = object()
log = logging.getLogger("mcad.config")


def integer(value: Any, key: str, minimum: int, where: str = "") -> int:
    """`value` as an int >= minimum; bools and fractional numbers are refused (`steps=true` is
    not a step count)."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    if isinstance(value, float) and value.is_integer():
        value, ok = int(value), True
    if not ok or value < minimum:
        want = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        # the CLI prefixes "mcad <command>: error:"; `where` is for callers outside it
        raise ValueError(f"{key}={value!r}: must be {want}" + (f" ({where})" if where else ""))
    return value


def require_counts(cfg: Mapping, minimums: Mapping[str, int], where: str = "") -> None:
    """Each dotted key of `minimums` present in `cfg` must be an integer >= its minimum (absent
    keys are the command's defaults: left to it)."""
    for key, minimum in minimums.items():
        value = get(dict(cfg), key, _MISSING)
        if value is not _MISSING and value is not None:
            integer(value, key, minimum, where)
    for key in minimums:
        if key.rsplit(".", 1)[-1] == "warmup":
            warn_warmup(cfg, key)


def warn_warmup(cfg: Mapping, key: str = "warmup") -> None:
    """One warning when a run's warmup is not below its steps: the learning rate would still be
    rising at the last step and never decay (the cosine schedule starts after the warmup)."""
    steps_key = key[: -len("warmup")] + "steps"
    warmup, steps = get(dict(cfg), key), get(dict(cfg), steps_key)
    if isinstance(warmup, int) and isinstance(steps, int) and steps >= 1 and warmup >= steps:
        log.warning("%s=%d is not below %s=%d: the learning rate is still warming up at the last step and never "
                    "decays; set %s below %s (e.g. %s=%d)", key, warmup, steps_key, steps, key, steps_key, key,
                    max(0, steps // 10))


# The counts of each command's recipe (dotted keys) and the least value that means something.
TRAIN = {"steps": 1, "batch_size": 1, "warmup": 0, "ckpt_every": 0}
TEACHERS = {"seed": 0, "threads": 1, "tokenizer.vocab_size": 8, "tokenizer.context_length": 3, "eval.rerank_k": 1,
            **{f"dual.{k}": v for k, v in TRAIN.items()}, **{f"fusion.{k}": v for k, v in TRAIN.items()},
            "fusion.batch_size": 2, "fusion.list_k": 2, "fusion.neighbours": 1}
STUDENT = {"seed": 0, "threads": 1, "neighbours": 1, **TRAIN, "adapters.steps": 1, "adapters.batch_size": 2}
CACHE = {"threads": 1, "neighbours": 1, "cache_shard_images": 1}
# a split may be empty (a test-only set for a report or an index), not all three
DATA = {"seed": 0, "n_train": 0, "n_val": 0, "n_test": 0, "image_size": 16, "captions_per_image": 1,
        "n_distill": 0, "distill_captions": 1}
