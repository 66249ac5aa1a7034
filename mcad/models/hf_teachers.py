"""Real teachers from Hugging Face `transformers`, loaded offline from local folders.

- `CLIPTeacher`: a dual-stream teacher (`transformers.CLIPModel`) with the `DualEncoder` interface
  that distillation needs (`encode_image`, `encode_text`, `image_tokens`, `text_tokens`, ...).
- `BLIPITMTeacher`: a single-stream fusion teacher (`transformers.BlipForImageTextRetrieval`) with
  the `FusionModel` interface (`image_tokens`, `text_tokens`, `fuse`, `score_pairs`) plus BLIP's
  ITC projections for candidates.
- `load_teacher(spec)`: `{"source": "hf-clip" | "hf-blip-itm" | "mcad", "path": ...}`.

Nothing here downloads: every `from_pretrained` runs with `local_files_only=True`. `path` is a
`save_pretrained` folder (or a repo id already in the local HF cache). No torchvision: images are
preprocessed with PIL/numpy/torch.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.functional import normalize as _unit

from mcad.tokenizer import Tokenizer

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
HOWTO = {
    "hf-clip": "openai/clip-vit-base-patch32",
    "hf-blip-itm": "Salesforce/blip-itm-base-coco",
}
# what each source loads: config.json's model_type and the class its `architectures` must name
EXPECTED = {"hf-clip": ("clip", "CLIPModel"), "hf-blip-itm": ("blip", "BlipForImageTextRetrieval")}
ROLE_OF = {"hf-clip": "dual", "hf-blip-itm": "fusion"}


def _howto(source: str, path) -> str:
    repo = HOWTO.get(source, "<repo-id>")
    return (f"on a machine with network run `huggingface-cli download {repo} --local-dir {path}` "
            f"(or `save_pretrained` the model and its tokenizer there), then copy the folder here")


def resolve_folder(path: str | Path, source: str) -> Path:
    """A local model folder with config.json and weights; a repo id is looked up in the local HF
    cache only. Anything missing -> one-line FileNotFoundError naming the path and the fix."""
    p = Path(path).expanduser()
    if not p.exists() and "/" in str(path) and not str(path).startswith(("/", ".", "~")):
        try:  # "org/name" already in the local HF cache?
            from huggingface_hub import snapshot_download

            p = Path(snapshot_download(str(path), local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached (or hub missing): report below
            p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{path}: no such model folder; {_howto(source, path)}")
    if not (p / "config.json").exists():
        raise FileNotFoundError(f"{p}: no config.json in the model folder; {_howto(source, p)}")
    if not any((p / f).exists() for f in WEIGHT_FILES):
        raise FileNotFoundError(f"{p}: no model weights ({' / '.join(WEIGHT_FILES[::2])}); {_howto(source, p)}")
    check_class(p, source)
    return p


def check_class(folder: Path, source: str) -> None:
    """config.json must describe the class `source` loads: a CLIP folder given as the fusion teacher
    would otherwise load as a BLIP with random weights (transformers only warns)."""
    if source not in EXPECTED:
        return
    f = folder / "config.json"
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{f}: not valid JSON ({e})") from None
    model_type, cls = EXPECTED[source]
    have_type, archs = cfg.get("model_type"), cfg.get("architectures") or []
    if have_type == model_type and (not archs or cls in archs):
        return
    have = ", ".join(archs) or f"model_type {have_type!r}"
    other = next((s for s, (t, c) in EXPECTED.items() if s != source and (t == have_type or c in archs)), None)
    fix = (f"give it as the {ROLE_OF[other]} teacher ({ROLE_OF[other]}.source={other} {ROLE_OF[other]}.path={folder})"
           f" and a {cls} folder as {ROLE_OF[source]}.path" if other else
           f"give a {cls} folder as {ROLE_OF[source]}.path (e.g. {HOWTO[source]})")
    raise ValueError(f"{f}: a {have} model, not the {cls} that {source} loads: {fix}")


def _read_preprocessor(folder: Path) -> dict:
    """The image processor's settings: preprocessor_config.json, or the `image_processor` entry of
    processor_config.json (what saving a whole processor writes in newer transformers): without
    either, the defaults apply."""
    for name, entry in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        f = folder / name
        if not f.exists():
            continue
        try:
            cfg = json.loads(f.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{f}: not valid JSON ({e.msg})") from None
        cfg = cfg.get(entry) if entry else cfg
        if isinstance(cfg, dict):
            return cfg
    return {}


def _size_value(v, key: str):
    """preprocessor_config sizes come as an int (old) or a dict (new)."""
    if v is None:
        return None
    if isinstance(v, dict):
        return v.get(key) or v.get("height") or v.get("shortest_edge")
    if isinstance(v, (list, tuple)):
        return int(v[0])
    return int(v)


def _to_pil_list(images):
    """PIL image, uint8 array [3,H,W] / [H,W,3] / [B,3,H,W], or a list of these -> list of RGB PIL."""
    from PIL import Image

    if isinstance(images, Image.Image):
        return [images.convert("RGB")]
    if isinstance(images, (list, tuple)):
        return [im for x in images for im in _to_pil_list(x)]
    a = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if a.dtype != np.uint8:
        raise ValueError(f"preprocess: expected uint8 pixels, got {a.dtype}")
    if a.ndim == 4:
        return [im for x in a for im in _to_pil_list(x)]
    if a.ndim == 3 and a.shape[0] == 3:  # mcad's layout: uint8 [3,H,W]
        a = a.transpose(1, 2, 0)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"preprocess: expected an RGB image ([3,H,W] or [H,W,3]), got shape {a.shape}")
    return [Image.fromarray(np.ascontiguousarray(a), "RGB")]


def _normalize(arrs: list[np.ndarray], mean, std) -> torch.Tensor:
    x = torch.from_numpy(np.stack(arrs).astype(np.float32)).permute(0, 3, 1, 2) / 255.0
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / s


def clip_preprocess(images, resize: int, crop: int, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> torch.Tensor:
    """CLIP's preprocessing (as transformers' CLIPImageProcessor): resize the shortest side to
    `resize` (bicubic, long side int(resize * long / short)), centre-crop `crop` (top-left
    (H - crop) // 2), scale to [0, 1], normalise. Returns float32 [B, 3, crop, crop]."""
    from mcad.data.stream import View

    return _through_view(images, View(int(crop), "shortest", int(resize)), mean, std)


def square_preprocess(images, size: int, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> torch.Tensor:
    """BLIP's preprocessing: resize to size x size (bicubic, no crop), scale, normalise."""
    from mcad.data.stream import View

    return _through_view(images, View(int(size), "squash"), mean, std)


def _through_view(images, view, mean, std) -> torch.Tensor:
    """The one decoder of training and evaluation (mcad.data.stream.apply_view), then mean/std."""
    from mcad.data.stream import apply_view

    return _normalize([apply_view(im, view).transpose(1, 2, 0) for im in _to_pil_list(images)], mean, std)


def _first_eot_mask(ids: torch.Tensor, eot_id: int) -> torch.Tensor:
    """1 up to and including the first <eot>, 0 after it. (CLIP's pad id 0 is also the token "!",
    so `ids != pad` would mask real text.)"""
    is_eot = (ids == eot_id).long()
    return ((torch.cumsum(is_eot, dim=1) - is_eot) == 0).long()


# -- tokenizers ----------------------------------------------------------------------------------
def load_clip_tokenizer(folder: Path, context_length: int) -> Tokenizer:
    f = folder / "tokenizer.json"
    if f.exists():
        tok = Tokenizer.load(f, context_length=context_length)
        if tok.kind != "clip":  # an mcad tokenizer.json with metadata: keep its ids, size the context
            tok.context_length = context_length
        return tok
    if (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
        from transformers import CLIPTokenizer

        hf = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
        return Tokenizer.from_clip_tokenizer(hf.backend_tokenizer, context_length, source=str(folder))
    raise FileNotFoundError(f"{folder}: no tokenizer.json (or vocab.json + merges.txt); "
                            f"{_howto('hf-clip', folder)}")


def load_bert_tokenizer(folder: Path, context_length: int = 35) -> Tokenizer:
    """BLIP's BERT WordPiece tokenizer behind the same `encode_batch` API:
    `[CLS] tokens... [SEP] [PAD]...` (as BertTokenizer with padding='max_length', truncation=True)."""
    from tokenizers import Tokenizer as HFTokenizer

    f = folder / "tokenizer.json"
    if f.exists():
        tok = HFTokenizer.from_file(str(f))
    elif (folder / "vocab.txt").exists():
        from transformers import BertTokenizer

        tok = BertTokenizer.from_pretrained(str(folder), local_files_only=True).backend_tokenizer
    else:
        raise FileNotFoundError(f"{folder}: no tokenizer.json (or vocab.txt); {_howto('hf-blip-itm', folder)}")
    vocab = tok.get_vocab()
    missing = [t for t in ("[CLS]", "[SEP]", "[PAD]") if t not in vocab]
    if missing:
        raise ValueError(f"{f}: not a BERT tokenizer (no {', '.join(missing)})")
    out = Tokenizer(tok, context_length, vocab["[CLS]"], vocab["[SEP]"], vocab["[PAD]"], kind="bert")
    out.enc_token_id = vocab.get("[ENC]")
    return out


# -- CLIP ----------------------------------------------------------------------------------------
class CLIPTeacher(nn.Module):
    """Dual-stream teacher around `transformers.CLIPModel` (frozen, eval mode)."""

    kind = "dual"

    def __init__(self, hf_model, tokenizer: Tokenizer, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
                 image_size: int | None = None, resize_size: int | None = None, name: str = "hf-clip"):
        super().__init__()
        self.hf = hf_model.eval()
        self.hf.requires_grad_(False)
        self.tokenizer = tokenizer
        cfg = hf_model.config
        self.name = name
        self.embed_dim = int(cfg.projection_dim)
        self.image_size = int(image_size or cfg.vision_config.image_size)
        self.resize_size = int(resize_size or self.image_size)
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self.context_length = int(tokenizer.context_length)
        self.eot_id, self.pad_id = tokenizer.eot_id, tokenizer.pad_id
        self.logit_scale = hf_model.logit_scale
        self.config = {"type": "hf-clip", "name": name, "embed_dim": self.embed_dim,
                       "image_size": self.image_size, "context_length": self.context_length}
        self.eval()

    def train(self, mode: bool = True):  # frozen teacher: always eval
        return super().train(False)

    @classmethod
    def from_pretrained(cls, path, context_length: int | None = None) -> "CLIPTeacher":
        from transformers import CLIPModel

        folder = resolve_folder(path, "hf-clip")
        hf = CLIPModel.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32)
        ctx = min(int(context_length or 77), int(hf.config.text_config.max_position_embeddings))
        tok = load_clip_tokenizer(folder, ctx)
        pp = _read_preprocessor(folder)
        crop = _size_value(pp.get("crop_size"), "height") or hf.config.vision_config.image_size
        resize = _size_value(pp.get("size"), "shortest_edge") or crop
        return cls(hf, tok, pp.get("image_mean", OPENAI_CLIP_MEAN), pp.get("image_std", OPENAI_CLIP_STD),
                   image_size=crop, resize_size=resize, name=str(path))

    @property
    def image_view(self):
        """How training and evaluation decode image files for it (mcad.data.stream): as clip_preprocess."""
        from mcad.data.stream import View

        return View(self.image_size, "shortest", self.resize_size)

    def preprocess(self, images) -> torch.Tensor:
        """PIL image(s) or uint8 pixels -> normalised float32 [B, 3, S, S]."""
        return clip_preprocess(images, self.resize_size, self.image_size, self.image_mean, self.image_std)

    def attention_mask(self, ids: torch.Tensor) -> torch.Tensor:
        return _first_eot_mask(ids, self.eot_id)

    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.hf.vision_model(pixel_values=pixels).last_hidden_state

    def text_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.hf.text_model(input_ids=ids, attention_mask=self.attention_mask(ids)).last_hidden_state

    def encode_image(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.hf.visual_projection(self.hf.vision_model(pixel_values=pixels).pooler_output)
        return _unit(x, dim=-1) if normalize else x

    def encode_text(self, ids: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        tokens = self.text_tokens(ids)  # final-layer-normed last hidden states
        pos = (ids == self.eot_id).int().argmax(dim=1)  # the first <eot> (pooling as in CLIP)
        x = self.hf.text_projection(tokens[torch.arange(ids.shape[0], device=ids.device), pos])
        return _unit(x, dim=-1) if normalize else x

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor):
        return self.encode_image(pixels), self.encode_text(ids), self.logit_scale.exp().clamp(max=100.0)


# -- BLIP ITM ------------------------------------------------------------------------------------
class BLIPITMTeacher(nn.Module):
    """Single-stream teacher around `transformers.BlipForImageTextRetrieval` (frozen, eval mode).

    ITM follows transformers' `use_itm_head=True` path: the text encoder runs over the ids as
    tokenized ([CLS] first) with cross-attention to all image tokens; h is the fused [CLS] state,
    m = itm_head[1] - itm_head[0]. With `first_token="enc"` the first id is replaced by
    `[ENC]` as in Salesforce's original BLIP (needs `[ENC]` in the vocabulary)."""

    kind = "fusion"

    def __init__(self, hf_model, tokenizer: Tokenizer, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
                 image_size: int | None = None, first_token: str = "cls", name: str = "hf-blip-itm"):
        super().__init__()
        self.hf = hf_model.eval()
        self.hf.requires_grad_(False)
        self.tokenizer = tokenizer
        cfg = hf_model.config
        self.name = name
        self.embed_dim = int(cfg.image_text_hidden_size)
        self.width = int(cfg.text_config.hidden_size)
        self.image_size = int(image_size or cfg.vision_config.image_size)
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self.context_length = int(tokenizer.context_length)
        self.pad_id = tokenizer.pad_id
        if first_token not in ("cls", "enc"):
            raise ValueError(f"BLIP first_token must be 'cls' or 'enc', got {first_token!r}")
        if first_token == "enc" and getattr(tokenizer, "enc_token_id", None) is None:
            raise ValueError(f"{name}: first_token='enc' but the tokenizer has no [ENC] token")
        self.first_token = first_token
        self.config = {"type": "hf-blip-itm", "name": name, "embed_dim": self.embed_dim, "width": self.width,
                       "image_size": self.image_size, "context_length": self.context_length,
                       "first_token": first_token}
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)

    @classmethod
    def from_pretrained(cls, path, context_length: int | None = None, first_token: str = "cls") -> "BLIPITMTeacher":
        from transformers import BlipForImageTextRetrieval

        folder = resolve_folder(path, "hf-blip-itm")
        hf = BlipForImageTextRetrieval.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32)
        ctx = min(int(context_length or 35), int(hf.config.text_config.max_position_embeddings))
        tok = load_bert_tokenizer(folder, ctx)
        pp = _read_preprocessor(folder)
        size = _size_value(pp.get("size"), "height") or hf.config.vision_config.image_size
        return cls(hf, tok, pp.get("image_mean", OPENAI_CLIP_MEAN), pp.get("image_std", OPENAI_CLIP_STD),
                   image_size=size, first_token=first_token, name=str(path))

    @property
    def image_view(self):
        """How training and evaluation decode image files for it (mcad.data.stream): as square_preprocess."""
        from mcad.data.stream import View

        return View(self.image_size, "squash")

    def preprocess(self, images) -> torch.Tensor:
        return square_preprocess(images, self.image_size, self.image_mean, self.image_std)

    def attention_mask(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids != self.pad_id).long()

    # -- token sequences -------------------------------------------------------------------------
    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.hf.vision_model(pixel_values=pixels).last_hidden_state

    def text_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """The ITM input ids (cheap to keep per caption; the text encoder runs per pair in `fuse`)."""
        if self.first_token == "enc":
            ids = ids.clone()
            ids[:, 0] = self.tokenizer.enc_token_id
        return ids

    def fuse(self, img_tok: torch.Tensor, txt_tok: torch.Tensor, ids: torch.Tensor):
        """Paired rows: (h [B, hidden] fused [CLS] state, m [B] ITM match logit)."""
        kw = {"encoder_embeds": txt_tok} if txt_tok.is_floating_point() else {"input_ids": txt_tok}
        img_att = torch.ones(img_tok.shape[:-1], dtype=torch.long, device=img_tok.device)
        out = self.hf.text_encoder(attention_mask=self.attention_mask(ids), encoder_hidden_states=img_tok,
                                   encoder_attention_mask=img_att, **kw)
        h = out.last_hidden_state[:, 0, :]
        logits = self.hf.itm_head(h)
        return h, logits[:, 1] - logits[:, 0]

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor):
        return self.fuse(self.image_tokens(pixels), self.text_tokens(ids), ids)

    def score_pairs(self, img_tok, txt_tok, ids, img_idx, txt_idx, batch_size: int = 256):
        from mcad.models.fusion import score_pairs

        return score_pairs(self.fuse, img_tok, txt_tok, ids, img_idx, txt_idx, batch_size)

    # -- ITC (candidates), as transformers' use_itm_head=False path --------------------------------
    def encode_image(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.hf.vision_proj(self.image_tokens(pixels)[:, 0, :])
        return _unit(x, dim=-1) if normalize else x

    def encode_text(self, ids: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        out = self.hf.text_encoder(input_ids=ids, attention_mask=self.attention_mask(ids))
        x = self.hf.text_proj(out.last_hidden_state[:, 0, :])
        return _unit(x, dim=-1) if normalize else x


# -- entry point ---------------------------------------------------------------------------------
SOURCES = ("hf-clip", "hf-blip-itm", "mcad")


def load_teacher(spec: dict, role: str | None = None):
    """`{"source": "hf-clip"|"hf-blip-itm"|"mcad", "path": ...}` (+ optional `context_length`,
    and for BLIP `first_token`: "cls" (transformers) or "enc" (original BLIP)) -> frozen teacher.
    `role` ("dual" or "fusion"): what the caller needs; a source or checkpoint of the other kind is
    refused in one line."""
    if not isinstance(spec, dict) or "path" not in spec:
        raise ValueError(f"teacher spec needs 'source' and 'path', got {spec!r}")
    source, path = spec.get("source", "mcad"), spec["path"]
    if role is not None and ROLE_OF.get(source, role) != role:
        raise ValueError(f"{role}.source={source}: {source} is a {ROLE_OF[source]} teacher; the {role} teacher is "
                         f"{' or '.join(s for s, r in ROLE_OF.items() if r == role)} (or mcad)")
    if source == "hf-clip":
        return CLIPTeacher.from_pretrained(path, context_length=spec.get("context_length"))
    if source == "hf-blip-itm":
        return BLIPITMTeacher.from_pretrained(path, context_length=spec.get("context_length"),
                                              first_token=spec.get("first_token", "cls"))
    if source == "mcad":
        from mcad.models.checkpoint import load_model

        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such teacher checkpoint; train it first (`make teachers`) "
                                    f"or copy runs/teachers/ from the machine that trained it")
        model = load_model(p, kind=role, role=f"{role}=" if role else "")
        model.requires_grad_(False)
        tok = (p if p.is_dir() else p.parent) / "tokenizer.json"
        model.tokenizer = Tokenizer.load(tok) if tok.exists() else None
        return model
    raise ValueError(f"unknown teacher source {source!r} ({', '.join(SOURCES)})")
