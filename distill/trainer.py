"""A small training loop shared by the teacher and student recipes.

AdamW + linear warm-up + cosine decay, gradient clipping, bf16 autocast (optional on the CPU, always on
CUDA), and a resumable
checkpoint written atomically every N steps. Batches must be a pure function of the step (see
`mcad.distill.sampling`), so a resumed run sees exactly the batches the uninterrupted one would have:
together with the saved optimizer/scheduler/RNG states, resume is bit-exact.

Ctrl-C finishes the step under way, saves the checkpoint and ends with one line saying where it
is (`TrainingInterrupted`); a second Ctrl-C stops at once.

The checkpoint file starts with a one-line header holding the sha256 of the torch payload after it,
checked on resume: a damaged or truncated file is one line naming it and the fix, never a resumed
run. A loss (or gradient) that goes non-finite stops the run at that step, before the step is
applied, with one line naming the step and the logged term (`NonFiniteLoss`); weights that are not
finite are never written.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
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
# header line of a checkpoint: CKPT_MAGIC + sha256 hex of the payload + "\n", then torch.save's bytes
CKPT_MAGIC = b"MCAD-CKPT-SHA256 "
LEGACY_ZIP = b"PK\x03\x04"  # torch.save's own format: the checkpoints written before the header
RESUME_FIX = "delete it to start over, or restore it from a copy"


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during `Trainer.fit`; the message says where the last checkpoint is."""


class DamagedCheckpoint(ValueError):
    """A resume checkpoint that fails its recorded sha256 or cannot be read (one line, names it)."""


class NonFiniteLoss(RuntimeError):
    """The loss, a logged term or the gradient norm went NaN/inf (one line: step and term)."""


def checkpoint_header(payload: bytes | memoryview) -> bytes:
    """The header line that records the payload's sha256 (the file is header + payload)."""
    return CKPT_MAGIC + hashlib.sha256(payload).hexdigest().encode("ascii") + b"\n"


def verified_payload(path: Path, raw: bytes) -> memoryview:
    """The torch payload of a checkpoint file's bytes, after its sha256 header is checked. A file in
    torch's own format (written before the header) has nothing to check and is taken as it is."""
    if raw.startswith(LEGACY_ZIP):
        log.warning("%s: checkpoint from before content hashes were recorded; resumed unverified", path)
        return memoryview(raw)
    end = raw.find(b"\n", 0, len(CKPT_MAGIC) + 80)
    if not raw.startswith(CKPT_MAGIC) or end < 0:
        raise DamagedCheckpoint(f"{path}: damaged training checkpoint (no valid sha256 header); {RESUME_FIX}")
    payload = memoryview(raw)[end + 1:]
    if raw[:end + 1] != checkpoint_header(payload):
        raise DamagedCheckpoint(f"{path}: damaged training checkpoint (content does not match the sha256 recorded "
                                f"when it was saved); {RESUME_FIX}")
    return payload


def non_finite_weights(modules: dict) -> list[str]:
    """Names (`module.param`) of parameters or buffers holding NaN or inf."""
    return [f"{k}.{n}" for k, m in modules.items() for n, t in m.state_dict().items()
            if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all())]


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
        """Header (sha256 of the payload) + torch.save's bytes, written atomically. Weights that are
        not finite are refused (nothing non-finite is kept)."""
        path = Path(path or self.ckpt_path)
        bad = non_finite_weights(self.modules)
        if bad:
            raise NonFiniteLoss(f"{self.desc}: weights not finite at step {self.step} ({', '.join(bad[:3])}); "
                                f"not saved to {path}; lower lr= or check the loss settings")
        with atomic_path(path) as tmp:  # a failed write is named by mcad.io (a full disk included)
            buf = io.BytesIO()
            torch.save(self.state(), buf)
            payload = buf.getbuffer()
            with open(tmp, "wb") as f:
                f.write(checkpoint_header(payload))
                f.write(payload)
        self.saved_step = self.step
        return path

    def resume(self, path: str | Path | None = None) -> bool:
        path = Path(path or self.ckpt_path) if (path or self.ckpt_path) else None
        if path is not None:
            sweep_stale_tmp(path.parent)  # a save killed mid-write leaves its temp file
        if path is None or not path.exists():
            return False
        st = self._read_checkpoint(path)
        saved = st.get("recipe")
        if self.recipe is not None and saved is not None and saved != self.recipe:
            diff = recipe_diff(saved, self.recipe)
            raise ValueError(f"{path}: checkpoint of another recipe (differs in {', '.join(diff)}); "
                             "delete it to start over (or write the run elsewhere)")
        try:
            for k, m in self.modules.items():
                m.load_state_dict(st["modules"][k])
            self.opt.load_state_dict(st["opt"])
            self.sched.load_state_dict(st["sched"])
            self.step, self.history = int(st["step"]), list(st["history"])
            torch.set_rng_state(st["rng"]["torch"])
            np.random.set_state(st["rng"]["numpy"])
            random.setstate(st["rng"]["python"])
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise DamagedCheckpoint(f"{path}: not a checkpoint of this training ({type(e).__name__}: "
                                    f"{str(e).splitlines()[0][:160] if str(e) else ''}); delete it to start over") from None
        self.saved_step = self.step
        log.info("%s: resumed from %s at step %d", self.desc, path, self.step)
        return True

    @staticmethod
    def _read_checkpoint(path: Path) -> dict:
        """The saved state, its sha256 checked first: a torn, truncated or flipped file is one line
        naming it, never trained over."""
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise DamagedCheckpoint(f"{path}: unreadable training checkpoint ({e.strerror or e}); {RESUME_FIX}") from None
        payload = verified_payload(path, raw)
        try:
            st = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)
        except Exception as e:  # a torn or foreign file: say which and stop, never train over it
            raise DamagedCheckpoint(f"{path}: damaged training checkpoint ({type(e).__name__}: "
                                    f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}); {RESUME_FIX}") from None
        if not isinstance(st, dict):
            raise DamagedCheckpoint(f"{path}: damaged training checkpoint (not a saved training state); {RESUME_FIX}")
        return st

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
            except (TrainingInterrupted, NonFiniteLoss):
                bar.close()
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

    def _check_finite(self, loss: float, logs: dict, grad: float | None = None) -> None:
        """Stop at this step, before it is applied, when the loss, a logged term or the gradient norm
        is NaN/inf: one line naming the step, the term and where the last good checkpoint is."""
        terms = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float)) or torch.is_tensor(v)}
        bad = [f"{k} {v}" for k, v in terms.items() if not math.isfinite(v)]
        if math.isfinite(loss) and not bad and (grad is None or math.isfinite(grad)):
            return
        if not math.isfinite(loss) or bad:
            what = f"loss {loss}" + (f" (term {', '.join(bad)})" if bad else " (the total; no logged term is)")
        else:
            what = f"gradient norm {grad} (loss {loss:.6g})"
        where = (f"; the last checkpoint {self.ckpt_path} (step {self.saved_step}) is kept"
                 if self.ckpt_path and self.saved_step is not None else "")
        raise NonFiniteLoss(f"{self.desc}: {what} at step {self.step + 1} of {self.steps}; stopped before applying it, "
                            f"nothing saved from it{where}; check the loss settings (a temperature of 0 divides by "
                            f"zero) or lower lr=")

    def _device_type(self) -> str:
        """Where the modules are: "cuda" puts the forward under bf16 autocast (mcad.accelerator)."""
        return next((p.device.type for m in self.modules.values() for p in m.parameters()), "cpu")

    def _loop(self, loss_fn, end: int, bar, stop: threading.Event) -> None:
        dev = self._device_type()
        while self.step < end:
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=self.bf16 or dev == "cuda"):
                loss, logs = loss_fn(self.step)
            self._check_finite(float(loss.detach()), logs)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip) if self.grad_clip > 0 else torch.tensor(0.0)
            if not math.isfinite(float(gnorm)):
                self._check_finite(float(loss.detach()), logs, grad=float(gnorm))
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
