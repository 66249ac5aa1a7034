"""Text -> fixed-length token ids with the `tokenizers` library; no torch, so it can sit next to
the on-device runtime.

Every sequence is `<sot> tokens... <eot> <pad>...`, truncated so `<eot>` always survives. The
text towers pool at the single position where id == eot_id, which exports as eq/mul/sum (no
argmax, no data-dependent indexing).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, normalizers, pre_tokenizers, processors, trainers

PAD, SOT, EOT = "<pad>", "<sot>", "<eot>"
CLIP_SOT, CLIP_EOT = "<|startoftext|>", "<|endoftext|>"
META_KEY = "mcad"  # extra metadata stored beside the tokenizer.json content


class Tokenizer:
    def __init__(self, tok: HFTokenizer, context_length: int, sot_id: int, eot_id: int, pad_id: int,
                 kind: str = "bpe"):
        self.tok = tok
        self.context_length = int(context_length)
        self.sot_id, self.eot_id, self.pad_id = int(sot_id), int(eot_id), int(pad_id)
        self.kind = kind
        self.tok.no_padding()
        self.tok.no_truncation()

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def content_sha256(self) -> str:
        """sha256 of what maps text to ids: the model section (vocabulary, merges, unknown token),
        the added tokens, the normaliser and the pre-tokeniser (canonical JSON); not the context
        length, padding or truncation, which are checked on their own. Two tokenizers of the same
        size but other ids differ here."""
        if getattr(self, "_content_sha256", None) is None:
            data = json.loads(self.tok.to_str())
            part = {k: data.get(k) for k in ("model", "added_tokens", "normalizer", "pre_tokenizer")}
            text = json.dumps(part, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
            self._content_sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()
        return self._content_sha256

    def encode(self, text: str) -> np.ndarray:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Iterable[str]) -> np.ndarray:
        texts = list(texts)
        L = self.context_length
        out = np.full((len(texts), L), self.pad_id, dtype=np.int64)
        # Special tokens typed in the text ("<eot>", "<|endoftext|>") are matched by the tokenizer;
        # drop them so each row has exactly one sot and one eot (eot pooling depends on it).
        drop = {self.sot_id, self.eot_id} | ({self.pad_id} if self.kind == "bpe" else set())
        for i, enc in enumerate(self.tok.encode_batch(texts, add_special_tokens=False)):
            body = [t for t in enc.ids if t not in drop][: L - 2]
            out[i, 0] = self.sot_id
            out[i, 1 : 1 + len(body)] = body
            out[i, 1 + len(body)] = self.eot_id
        return out

    @property
    def unk_id(self) -> int | None:
        """The id of the unknown token (None: the tokenizer has none, e.g. byte-level BPE, or it is
        one of the special ids, as CLIP's <|endoftext|>)."""
        name = getattr(self.tok.model, "unk_token", None)
        i = self.tok.token_to_id(name) if name else None
        return None if i is None or i in (self.sot_id, self.eot_id, self.pad_id) else int(i)

    def unrepresented(self, text: str) -> str | None:
        """One line on what of `text` the encoder will not see (None: all of it): words the
        tokenizer knows only as unknown tokens, and the tail cut at the context length, as
        encode_batch cuts it."""
        enc = self.tok.encode(text, add_special_tokens=False)
        drop = {self.sot_id, self.eot_id} | ({self.pad_id} if self.kind == "bpe" else set())
        toks = [(i, w, o) for i, w, o in zip(enc.ids, enc.word_ids, enc.offsets) if i not in drop]
        spans: dict = {}
        for _, w, (a, b) in toks:  # each word's characters in the query as typed
            lo, hi = spans.get(w, (a, b))
            spans[w] = (min(lo, a), max(hi, b))
        notes = []
        unk = self.unk_id
        if unk is not None:
            bad = list(dict.fromkeys(w for i, w, _ in toks if i == unk))
            if bad:
                shown = ", ".join(repr(text[slice(*spans[w])]) for w in bad[:5]) + (" ..." if len(bad) > 5 else "")
                head = "no word of the query is known to the tokenizer" if len(bad) == len(spans) \
                    else f"{len(bad)} of {len(spans)} words hold characters the tokenizer does not know"
                notes.append(f"{head} ({shown}): the results do not reflect them")
        keep = self.context_length - 2
        if len(toks) > keep:
            cut = toks[keep][2][0]
            tail = text[cut:].strip()
            notes.append(f"query cut at the context length ({len(toks)} tokens, the encoder reads {keep}): "
                         f"{tail[:40]!r}{'...' if len(tail) > 40 else ''} is not searched")
        return "; ".join(notes) or None

    def decode(self, ids: Iterable[int]) -> str:
        # up to the first end-of-text: pads follow it, and CLIP's pad id 0 is also the token "!"
        keep, ended = [], False
        for i in map(int, ids):
            if i == self.eot_id:
                ended = True
                break
            if not (i == self.sot_id and not keep):
                keep.append(i)
        while not ended and keep and keep[-1] == self.pad_id:
            keep.pop()
        text = self.tok.decode(keep)
        if self.kind == "clip":  # CLIP marks word ends with "</w>"; its byte-level decoder keeps them
            text = " ".join(text.replace("</w>", " ").split())
        return text

    # -- persistence -------------------------------------------------------------------------
    def to_json(self) -> str:
        data = json.loads(self.tok.to_str())
        data[META_KEY] = {"context_length": self.context_length, "sot_id": self.sot_id,
                          "eot_id": self.eot_id, "pad_id": self.pad_id, "kind": self.kind}
        return json.dumps(data, ensure_ascii=False)

    def save(self, path: str | Path) -> Path:
        from mcad.io import atomic_write_text

        return atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path, context_length: int | None = None) -> "Tokenizer":
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: no tokenizer.json")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a valid tokenizer.json ({e.msg})") from None
        meta = data.pop(META_KEY, None)
        tok = HFTokenizer.from_str(json.dumps(data))
        if meta is not None:
            return cls(tok, context_length or meta["context_length"], meta["sot_id"], meta["eot_id"],
                       meta["pad_id"], meta.get("kind", "bpe"))
        return cls.from_clip_tokenizer(tok, context_length or 77, source=str(path))

    @classmethod
    def from_clip_tokenizer(cls, tok: HFTokenizer, context_length: int = 77, source: str = "") -> "Tokenizer":
        """A real CLIP `tokenizer.json` (byte-level BPE, <|startoftext|>/<|endoftext|>)."""
        vocab = tok.get_vocab()
        missing = [t for t in (CLIP_SOT, CLIP_EOT) if t not in vocab]
        if missing:
            raise ValueError(f"{source or 'tokenizer'}: not a CLIP tokenizer (no {', '.join(missing)})")
        # CLIP pads with 0 in open_clip; HF pads with <|endoftext|>. Pad with 0 so exactly one eot
        # appears per row, which is what eot pooling (and HF's first-eos pooling) expects.
        return cls(tok, context_length, vocab[CLIP_SOT], vocab[CLIP_EOT], 0, kind="clip")


def train_bpe(texts: Iterable[str], vocab_size: int = 512, context_length: int = 32,
              min_frequency: int = 2) -> Tokenizer:
    """A small BPE for the synthetic captions (lower-cased, whitespace/punctuation split)."""
    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=[PAD, SOT, EOT, "<unk>"], show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{SOT} $A {EOT}",
                                                       special_tokens=[(SOT, 1), (EOT, 2)])
    vocab = tok.get_vocab()
    return Tokenizer(tok, context_length, vocab[SOT], vocab[EOT], vocab[PAD], kind="bpe")
