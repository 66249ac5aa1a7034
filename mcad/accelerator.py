"""Where the tensors live: `device=auto|cpu|cuda[:N]` for teachers, cache, student and eval.

The code is device-agnostic: models go `.to(device)`, batches follow them, and on CUDA the forward
passes run under bf16 autocast (no loss scaling needed for bf16). `auto` picks CUDA when present.
A teacher used by code that holds its batches on the CPU (the cache builder, the online teacher
path) is wrapped in `OnDevice`: it takes CPU tensors, runs on the device and hands back float32 CPU
tensors, so that code needs no device logic of its own. On the CPU nothing is wrapped, and a
`device=cpu` run is bit-identical to one from before the option.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch

DEVICES = "auto, cpu, cuda, cuda:N"


def resolve_device(name: str | None, key: str = "device") -> torch.device:
    """`auto` -> cuda when available, else cpu; `cuda` without a GPU is one line with the fix."""
    text = str(name or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"{key}={name}: no CUDA GPU here (torch {torch.__version__}, cuda "
                             f"{torch.version.cuda or 'not built in'}): use {key}=cpu or {key}=auto")
        dev = torch.device(text)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{key}={name}: this machine has {torch.cuda.device_count()} GPU(s) (cuda:0.."
                             f"cuda:{torch.cuda.device_count() - 1})")
        return dev
    raise ValueError(f"{key}={name!r}: expected one of {DEVICES}")


def autocast(device: torch.device | str):
    """bf16 autocast on CUDA; nothing on the CPU (the CPU path stays float32, as before)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def model_device(model: Any) -> torch.device:
    """The device of a model's first parameter (cpu for a model without any)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _to(x: Any, device: torch.device) -> Any:
    return x.to(device, non_blocking=True) if isinstance(x, torch.Tensor) else x


def _back(x: Any) -> Any:
    if isinstance(x, tuple):
        return tuple(_back(v) for v in x)
    return x.float().cpu() if isinstance(x, torch.Tensor) and x.is_floating_point() else \
        (x.cpu() if isinstance(x, torch.Tensor) else x)


class OnDevice:
    """A frozen teacher on `device`, called with CPU tensors. Embeddings, fused features and ITM
    logits come back as float32 CPU tensors; token sequences (`image_tokens`, `text_tokens`) stay on
    the device, since they only go back into `fuse` (moving a BLIP image's 577 x 768 tokens to the
    host and back for every pair would cost more than the fusion itself). Attributes (image_mean,
    width, pad_id, tokenizer...) are the model's."""

    def __init__(self, model, device: torch.device):
        self._model = model.to(device).eval()
        self._device = torch.device(device)

    def __getattr__(self, name: str) -> Any:  # only reached for what this class does not define
        return getattr(self.__dict__["_model"], name)

    @property
    def device(self) -> torch.device:
        return self._device

    def _run(self, fn, *args, back: bool = True, **kw):
        with torch.no_grad(), autocast(self._device):
            out = fn(*(_to(a, self._device) for a in args), **kw)
        return _back(out) if back else out

    def encode_image(self, pixels, normalize: bool = True):
        return self._run(self._model.encode_image, pixels, normalize=normalize)

    def encode_text(self, ids, normalize: bool = True):
        return self._run(self._model.encode_text, ids, normalize=normalize)

    def image_tokens(self, pixels):
        return self._run(self._model.image_tokens, pixels, back=False)

    def text_tokens(self, ids):
        return self._run(self._model.text_tokens, ids, back=False)

    def fuse(self, img_tok, txt_tok, ids):
        return self._run(self._model.fuse, img_tok, txt_tok, ids)

    def score_pairs(self, img_tok, txt_tok, ids, img_idx, txt_idx, batch_size: int = 1024):
        from mcad.models.fusion import score_pairs

        return score_pairs(self.fuse, img_tok, txt_tok, ids, img_idx, txt_idx, batch_size)

    def __call__(self, *args):
        return self._run(self._model, *args)

    def parameters(self):
        return self._model.parameters()

    def eval(self):
        return self

    def train(self, mode: bool = True):  # a teacher: frozen
        return self

    def requires_grad_(self, flag: bool = True):
        self._model.requires_grad_(flag)
        return self


def place(model, device: torch.device):
    """A frozen teacher where it runs: the model itself on the CPU, wrapped in `OnDevice` elsewhere."""
    if device.type == "cpu":
        return model
    return OnDevice(model, device)
