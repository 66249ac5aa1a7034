"""Tiny randomly initialised real `transformers` teachers saved with `save_pretrained`: a CLIPModel with
a CLIP BPE tokenizer learned on a few sentences, and a BlipForImageTextRetrieval with a BERT
WordPiece tokenizer. What the tests and the loader benchmark (mcad.benchmarks.loader_rss) run the
real path with, offline: no registry package ships real CLIP/BLIP weights. Never for training a
student that ships."""
from __future__ import annotations

import collections
import json
from pathlib import Path

SOT, EOT = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clip_vocab_merges(texts, n_merges: int = 150):
    """A small CLIP-format BPE: 256 byte symbols, the same with `</w>`, learned merges, then
    <|startoftext|>, <|endoftext|> last (as in CLIP's vocab, so <|endoftext|> has the largest id)."""
    b2u = bytes_to_unicode()
    words = collections.Counter()
    for t in texts:
        for w in t.lower().split():
            s = [b2u[b] for b in w.encode("utf-8")]
            s[-1] += "</w>"
            words[tuple(s)] += 1
    merges = []
    for _ in range(n_merges):
        pairs = collections.Counter()
        for w, c in words.items():
            for a, b in zip(w, w[1:]):
                pairs[a, b] += c
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        new = collections.Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new[tuple(out)] += c
        words = new
    base = list(b2u.values())
    vocab = base + [c + "</w>" for c in base]
    for a, b in merges:
        if a + b not in vocab:
            vocab.append(a + b)
    vocab += [SOT, EOT]
    return {t: i for i, t in enumerate(vocab)}, merges


TRAIN_TEXTS = [
    "a photo of a cat sitting on the mat", "two dogs are playing in the park near a tree",
    "the red car is parked next to the white house", "a man riding a bike down the street",
    "a woman holding an umbrella in the rain", "people walking on the beach at sunset",
    "a plate of food with rice and vegetables", "the train is arriving at the station",
] * 3


def make_clip_tokenizer_folder(folder, texts=TRAIN_TEXTS, n_merges: int = 150):
    """vocab.json + merges.txt -> transformers.CLIPTokenizer -> save_pretrained(folder) (tokenizer.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_merges(texts, n_merges)
    src = folder / "_src"
    src.mkdir(exist_ok=True)
    (src / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (src / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n",
                                    encoding="utf-8")
    import transformers

    hf = transformers.CLIPTokenizer.from_pretrained(str(src), local_files_only=True)
    hf.save_pretrained(str(folder))
    return hf


def bert_vocab() -> list[str]:
    words = "a photo of the cat dog dogs two red car man riding bike down street playing in park".split()
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789") + list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~é東京")
    return (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words + chars + ["##" + c for c in chars[:36]]
            + ["##s", "##ing"] + ["[DEC]", "[ENC]"])


def save_tiny_blip(folder, extra_words=(), image_size=32, patch_size=8):
    """A tiny random BlipForImageTextRetrieval + BERT tokenizer.json, saved with save_pretrained.
    Returns the vocabulary's source folder (not part of a model folder; callers remove it)."""
    import torch
    import transformers

    folder = Path(folder)
    src = folder / "_vocab"
    src.mkdir(parents=True)
    vocab = bert_vocab() + list(extra_words)
    (src / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    transformers.BertTokenizer.from_pretrained(str(src), local_files_only=True).save_pretrained(str(folder))
    torch.manual_seed(1)
    cfg = transformers.BlipConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, encoder_hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64, pad_token_id=0,
                         bos_token_id=vocab.index("[DEC]"), sep_token_id=vocab.index("[SEP]")),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=patch_size, initializer_range=0.02),
        image_text_hidden_size=16)
    transformers.BlipForImageTextRetrieval(cfg).eval().save_pretrained(str(folder))
    return src


def save_tiny_clip(folder: Path, image_size: int = 224, mean=(0.48145466, 0.4578275, 0.40821073),
                   std=(0.26862954, 0.26130258, 0.27577711), patch_size: int = 32, seed: int = 0) -> Path:
    """A tiny random CLIPModel (width 32, 2 layers) at `image_size` + its CLIP tokenizer.json and a
    CLIPImageProcessor config (shortest edge = crop = image_size, as openai/clip-vit-base-patch32)."""
    import shutil

    import torch
    import transformers
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = make_clip_tokenizer_folder(Path(folder))
    torch.manual_seed(seed)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=patch_size),
        projection_dim=16)
    transformers.CLIPModel(cfg).eval().save_pretrained(str(folder))
    CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                          image_mean=list(mean), image_std=list(std)).save_pretrained(str(folder))
    shutil.rmtree(Path(folder) / "_src", ignore_errors=True)
    return Path(folder)
