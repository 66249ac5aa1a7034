"""A small training loop shared by the teacher and student recipes.

AdamW + linear warm-up + cosine decay, gradient clipping, bf16 autocast (optional on the CPU, always on
CUDA), and a resumable
checkpoint written atomically every N steps. Batches must be a pure function of the step (see
`mcad.distill.sampling`), so a resumed run sees exactly the batches the uninterrupted one would have:
together with the saved optimizer/scheduler/RNG states, resume is bit-exact.

Ctrl-C finishes the step under way, saves the checkpoint and ends with one line saying where it
is (`TrainingInterrupted`); a second Ctrl-C stops at once.
"""
from __future__ import annotations

import json
import logging
import contextlib
import math
import random
import signal
import threading
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from tqdm import tqdm

from mcad.io import atomic_path, sweep_stale_tmp

log = logging.getLogger("mcad.train")


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during `Trainer.fit`; the message says where the last checkpoint is."""


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def recipe_diff(saved: dict, now: dict) -> list[str]:
    """The dotted keys on which two recipes differ (`dual.steps`, `seed`), sorted."""
    a, b = _flatten(saved), _flatten(now)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def param_groups(modules: Iterable[torch.nn.Module], weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms, embeddings' position tables and temperatures."""
    decay, no_decay, seen = [], [], set()
    for m in modules:
        for name, p in m.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if p.ndim < 2 or "pos" in name or "logit_scale" in name or "cls" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine_lambda(warmup: int, total: int, min_ratio: float = 0.0) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        t = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return f


class Trainer:
    def __init__(self, modules: dict[str, torch.nn.Module], cfg: dict, ckpt_path: str | Path | None = None,
                 desc: str = "train", recipe: dict | None = None):
        """recipe: what decides the result (saved in the checkpoint; resuming under another recipe
        is refused rather than silently mixing two trainings)."""
        self.modules = modules
        self.recipe = json.loads(json.dumps(recipe, default=str)) if recipe is not None else None
        self.steps = int(cfg["steps"])
        if self.steps < 1:  # a run that trains nothing must not end with a model and exit 0
            raise ValueError(f"{desc}: steps={cfg['steps']}: must be a positive integer")
        self.grad_clip = float(cfg.get("grad_clip", 1.0))
        self.bf16 = bool(cfg.get("bf16", False))
        self.ckpt_every = int(cfg.get("ckpt_every", 0) or 0)
        self.ckpt_path = Path(ckpt_path) if ckpt_path else None
        self.desc = desc
        self.params = [p for g in param_groups(modules.values(), float(cfg.get("weight_decay", 0.1)))
                       for p in g["params"]]
        self.opt = torch.optim.AdamW(param_groups(modules.values(), float(cfg.get("weight_decay", 0.1))),
                                     lr=float(cfg["lr"]), betas=(0.9, 0.98), eps=1e-6)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, cosine_lambda(int(cfg.get("warmup", 0)), self.steps, float(cfg.get("min_lr_ratio", 0.0))))
        self.step = 0
        self.saved_step: int | None = None  # step of the last checkpoint written or resumed from
        self.history: list[dict] = []

    # -- checkpoints ---------------------------------------------------------------------------
    def state(self) -> dict:
        return {"step": self.step, "modules": {k: m.state_dict() for k, m in self.modules.items()},
                "opt": self.opt.state_dict(), "sched": self.sched.state_dict(), "history": self.history,
                "recipe": self.recipe,
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}}

    def save(self, path: str | Path | None = None) -> Path:
        path = Path(path or self.ckpt_path)
        with atomic_path(path) as tmp:
            torch.save(self.state(), tmp)
        self.saved_step = self.step
        return path

    def resume(self, path: str | Path | None = None) -> bool:
        path = Path(path or self.ckpt_path) if (path or self.ckpt_path) else None
        if path is not None:
            sweep_stale_tmp(path.parent)  # a save killed mid-write leaves its temp file
        if path is None or not path.exists():
            return False
        try:
            st = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # a torn or foreign file: say which and stop, never train over it
            raise ValueError(f"{path}: unreadable training checkpoint ({type(e).__name__}: {e}); delete it to start over") from None
        saved = st.get("recipe")
        if self.recipe is not None and saved is not None and saved != self.recipe:
            diff = recipe_diff(saved, self.recipe)
            raise ValueError(f"{path}: checkpoint of another recipe (differs in {', '.join(diff)}); "
                             "delete it to start over (or write the run elsewhere)")
        for k, m in self.modules.items():
            m.load_state_dict(st["modules"][k])
        self.opt.load_state_dict(st["opt"])
        self.sched.load_state_dict(st["sched"])
        self.step, self.history = int(st["step"]), list(st["history"])
        self.saved_step = self.step
        torch.set_rng_state(st["rng"]["torch"])
        np.random.set_state(st["rng"]["numpy"])
        random.setstate(st["rng"]["python"])
        log.info("%s: resumed from %s at step %d", self.desc, path, self.step)
        return True

    # -- loop ----------------------------------------------------------------------------------
    def log_line(self, rec: dict) -> str:
        """`<desc> step 1/2 loss 5.1234 lr 1.00e-03 clip 4.90123 dist 0.0101234 ...`: the loss
        terms too, to 6 significant digits, so the log pins a run (tests/test_distill_recipe.py)."""
        terms = "".join(f" {k} {v:.6g}" for k, v in rec.items() if k not in ("step", "loss", "lr", "grad_norm"))
        return f"{self.desc} step {rec['step']}/{self.steps} loss {rec['loss']:.6g} lr {rec['lr']:.2e}{terms}"

    def fit(self, loss_fn: Callable[[int], tuple[torch.Tensor, dict]], stop_at: int | None = None,
            progress: bool = True) -> list[dict]:
        """loss_fn(step) -> (loss, logs). Runs until `steps` (or `stop_at`, for tests of resume)."""
        end = min(self.steps, stop_at) if stop_at is not None else self.steps
        for m in self.modules.values():
            m.train()
        bar = tqdm(total=end, initial=self.step, desc=self.desc, unit="step", disable=not progress, dynamic_ncols=True)
        with self._deferred_interrupt() as stop:
            try:
                self._loop(loss_fn, end, bar, stop)
            except TrainingInterrupted:
                raise
            except KeyboardInterrupt:  # the second Ctrl-C, or one outside the main thread
                bar.close()
                raise TrainingInterrupted(self._interrupted_line(saved_now=False)) from None
        bar.close()
        for m in self.modules.values():
            m.eval()
        return self.history

    @contextlib.contextmanager
    def _deferred_interrupt(self):
        """The first SIGINT only sets a flag checked between steps, so the state saved is that of a
        whole step (one inside a step would break bit-exact resume). Main thread, one process only:
        ranks of a distributed run would stop at different steps and hang each other."""
        stop = threading.Event()
        import torch.distributed as dist

        if threading.current_thread() is not threading.main_thread() or (dist.is_available() and dist.is_initialized()) \
                or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # a background job ignores Ctrl-C: keep it so
            yield stop
            return

        def handler(signum, frame):
            stop.set()
            signal.signal(signal.SIGINT, previous)  # a second Ctrl-C interrupts at once
            log.warning("%s: interrupted; finishing step %d to save it (Ctrl-C again stops at once)",
                        self.desc, self.step + 1)

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield stop
        finally:
            signal.signal(signal.SIGINT, previous)

    def _interrupted_line(self, saved_now: bool) -> str:
        where = f"{self.desc}: interrupted at step {self.step} of {self.steps}; "
        if self.ckpt_path is None:
            return where + "this stage keeps no checkpoint (a new run starts it over)"
        if self.saved_step is None:
            return where + f"no checkpoint written yet (to {self.ckpt_path}); a new run starts over"
        state = "saved" if saved_now else "last checkpoint"
        return where + f"{state} {self.ckpt_path} (step {self.saved_step}): run the same command again to resume"

    def _device_type(self) -> str:
        """Where the modules are: "cuda" puts the forward under bf16 autocast (mcad.accelerator)."""
        return next((p.device.type for m in self.modules.values() for p in m.parameters()), "cpu")

    def _loop(self, loss_fn, end: int, bar, stop: threading.Event) -> None:
        dev = self._device_type()
        while self.step < end:
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=self.bf16 or dev == "cuda"):
                loss, logs = loss_fn(self.step)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip) if self.grad_clip > 0 else torch.tensor(0.0)
            self.opt.step()
            self.sched.step()
            self.step += 1
            rec = {"step": self.step, "loss": float(loss.detach()), "lr": self.sched.get_last_lr()[0],
                   "grad_norm": float(gnorm), **{k: float(v) for k, v in logs.items()}}
            self.history.append(rec)
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.3f}")
            if self.step % 50 == 0 or self.step == end or self.step == 1:
                log.info("%s", self.log_line(rec))
            if self.ckpt_path and self.ckpt_every and self.step % self.ckpt_every == 0:
                self.save()
            if stop.is_set():
                if self.ckpt_path and self.saved_step != self.step:
                    self.save()
                bar.close()
                raise TrainingInterrupted(self._interrupted_line(saved_now=self.ckpt_path is not None))
