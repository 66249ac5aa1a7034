"""mcad.tokenizer.Tokenizer on a CLIP tokenizer.json gives transformers' CLIP ids (pad 0 after the
single <|endoftext|> instead of HF's <|endoftext|> padding)."""
from __future__ import annotations

import random

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")

from tiny_hf import (EOT, SOT, TRAIN_TEXTS, bytes_to_unicode, clip_vocab_merges,  # noqa: E402,F401
                                 make_clip_tokenizer_folder)


def corpus(n: int = 200, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    fixed = [
        "", " ", "a", "A", "A photo of a Cat!!", "TWO DOGS", "it's the dog's ball; they're here, we've gone",
        "I'm sure you'll say he'd do it", "don't stop", "hello,world", "e.g. 3.14159 and 1,000,000 people",
        "2024-11-24 at 10:30am", "#hashtag @user http://example.com/a?b=c&d=e", "tab\tseparated\nnew  line",
        "   leading and trailing   ", "café naïve résumé", "cafe\u0301 (combining accent)", "Straße ÆØÅ æøå",
        "日本語のテキスト", "中文 字符", "한국어 텍스트", "emoji 😀🐱‍👤 👍🏽", "Ω ≈ ç √ ∫ ˜ µ ≤ ≥ ÷",
        "ﬁ ligature and ｆｕｌｌｗｉｄｔｈ", "quote \"double\" and 'single'", "(parens) [brackets] {braces} <angle>",
        "...!!!???", "a-b_c/d\\e|f", "$100 €50 £20 ¥1000", "100%", "mr. smith's dog", "the  the  the",
        "x" * 300, "word " * 120, "a photo of " * 40 + "the end", "supercalifragilisticexpialidocious " * 10,
        "1 2 3 4 5 6 7 8 9 0 " * 10, "🙂" * 80, "Ünïcödé " * 30, "a\u00a0non-breaking\u2003em-space",
        "zero\u200bwidth", "caps LOCK MiXeD cAsE", "text with <|endoftext|> inside", "<|startoftext|>hi",
        "a<|endoftext|>b", "<|endoftext|><|endoftext|>", "two " * 50 + "<|endoftext|> tail",
    ]
    words = ("a photo of the cat dog car man woman red two playing sitting street beach train food "
             "Zebra QUICK brown fox's jumps over lazy 42 3.5 1999 x-ray e-mail naïve café 東京 🚗 ").split()
    punct = list(",.;:!?'\"()-/&%$#@*+=[]{}<>~`^_|\\")
    out = list(fixed)
    while len(out) < n:
        k = rng.choice([1, 3, 8, 15, 40, 90])
        toks = []
        for _ in range(k):
            r = rng.random()
            if r < 0.7:
                w = rng.choice(words)
                toks.append(w.upper() if rng.random() < 0.1 else w.capitalize() if rng.random() < 0.1 else w)
            elif r < 0.85:
                toks.append(rng.choice(punct) * rng.choice([1, 1, 2, 3]))
            else:
                toks.append(str(rng.randint(0, 10 ** rng.randint(1, 7))))
        sep = rng.choice([" ", " ", " ", "", "  ", "\t"])
        out.append(sep.join(toks))
    return out


@pytest.fixture(scope="module")
def clip_tok(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cliptok")
    hf = make_clip_tokenizer_folder(folder)
    return folder, hf


def without_specials(text: str) -> str:
    """Special tokens typed in a caption are dropped by mcad's Tokenizer (one <eot> per row)."""
    return text.replace(SOT, " ").replace(EOT, " ")


def _check_against_hf(ours: np.ndarray, hf_ids: np.ndarray, texts, full_lens, sot: int, eot: int, L: int):
    """hf_ids: transformers' ids of `without_specials(texts)`, padding='max_length', truncation."""
    assert ours.shape == hf_ids.shape == (len(texts), L)
    for row, ref, text, n in zip(ours, hf_ids, texts, full_lens):
        assert row[0] == sot == ref[0], text
        assert (row == eot).sum() == 1 and (row == sot).sum() == 1, f"not one <sot>/<eot> in {text!r}"
        p = int(np.argmax(row == eot))
        assert row[: p + 1].tolist() == ref[: p + 1].tolist(), f"ids differ for {text!r}"
        assert (row[p + 1:] == 0).all(), f"pad after <|endoftext|> is not 0 for {text!r}"
        assert (ref[p + 1:] == eot).all(), f"HF has more tokens than we do for {text!r}"
        if n > L:  # truncated: <|endoftext|> survives, last
            assert p == L - 1, f"truncation must keep <|endoftext|> last for {text!r}"


def test_clip_tokenizer_json_matches_transformers(clip_tok):
    from mcad.tokenizer import Tokenizer

    folder, hf = clip_tok
    ours = Tokenizer.load(folder / "tokenizer.json")
    assert ours.kind == "clip" and ours.context_length == 77 and ours.pad_id == 0
    assert ours.eot_id == hf.eos_token_id == hf.convert_tokens_to_ids(EOT)
    assert ours.sot_id == hf.bos_token_id and ours.eot_id == ours.vocab_size - 1
    texts = corpus(200)
    plain = [without_specials(t) for t in texts]
    full_lens = [len(ids) for ids in hf(plain)["input_ids"]]  # untruncated, with <sot>/<eot>
    assert sum(n > 77 for n in full_lens) >= 20  # enough truncation cases

    got = ours.encode_batch(texts)
    assert got.dtype == np.int64
    reloaded = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    for ref_tok in (hf, reloaded):
        ref = np.asarray(ref_tok(plain, padding="max_length", truncation=True, max_length=77)["input_ids"])
        _check_against_hf(got, ref, texts, full_lens, ours.sot_id, ours.eot_id, 77)

    # a shorter context truncates the same way as HF with max_length
    short = Tokenizer.load(folder / "tokenizer.json", context_length=16).encode_batch(texts)
    ref = np.asarray(hf(plain, padding="max_length", truncation=True, max_length=16)["input_ids"])
    _check_against_hf(short, ref, texts, full_lens, ours.sot_id, ours.eot_id, 16)


def test_clip_tokenizer_roundtrip_through_mcad_save(clip_tok, tmp_path):
    from mcad.tokenizer import Tokenizer

    folder, _ = clip_tok
    ours = Tokenizer.load(folder / "tokenizer.json")
    ours.save(tmp_path / "tokenizer.json")
    again = Tokenizer.load(tmp_path / "tokenizer.json")
    assert (again.kind, again.sot_id, again.eot_id, again.pad_id, again.context_length) == \
        (ours.kind, ours.sot_id, ours.eot_id, ours.pad_id, ours.context_length)
    texts = corpus(60, seed=1)
    assert np.array_equal(again.encode_batch(texts), ours.encode_batch(texts))


def test_clip_decode_keeps_token_zero(clip_tok):
    """CLIP pads with id 0, which is also the token "!": decoding stops at <|endoftext|> instead
    of dropping every 0."""
    from mcad.tokenizer import Tokenizer

    folder, _ = clip_tok
    ours = Tokenizer.load(folder / "tokenizer.json")
    text = "wow!! a red square"  # "!" inside a word is id 0; at its end it is "!</w>"
    ids = ours.encode(text)
    end = int(np.argmax(ids == ours.eot_id))
    assert 0 in ids[:end].tolist() and (ids[end + 1:] == 0).all()
    assert ours.decode(ids).replace(" ", "") == text.replace(" ", "")
