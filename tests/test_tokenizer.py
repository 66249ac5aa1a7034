"""The synthetic-caption BPE path of `mcad.tokenizer` (the CLIP path is tested elsewhere)."""
from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np
import pytest

from mcad.data.synthetic import all_scenes, captions_for
from mcad.tokenizer import Tokenizer, train_bpe


@pytest.fixture(scope="module")
def captions() -> list[str]:
    rng = random.Random(0)
    scenes = all_scenes()
    return [c for _ in range(400) for c in captions_for(rng.choice(scenes), rng, 5)]


@pytest.fixture(scope="module")
def tok(captions) -> Tokenizer:
    return train_bpe(captions, vocab_size=200, context_length=16)


TEXTS = [
    "a red circle left of a blue square",
    "",
    "A  RED Circle,   to the LEFT of a blue box!",
    " ".join(["the green diamond is above the white cross"] * 10),  # far longer than 16 tokens
    "a red <eot> circle <sot> left of <pad> a <eot> blue square",  # special tokens typed in
    "zebra ünïcode 漢字 \t\n emoji 🙂",  # words never seen in training
]


def check_row(row: np.ndarray, tok: Tokenizer) -> int:
    """<sot> body <eot> <pad>...: returns the eot position."""
    assert row[0] == tok.sot_id
    assert (row == tok.sot_id).sum() == 1
    assert (row == tok.eot_id).sum() == 1
    e = int(np.flatnonzero(row == tok.eot_id)[0])
    assert (row[e + 1:] == tok.pad_id).all()
    assert (row[1:e] != tok.pad_id).all()
    assert ((row >= 0) & (row < tok.vocab_size)).all()
    return e


def test_train_bpe(tok, captions):
    assert tok.kind == "bpe" and tok.context_length == 16
    assert 20 < tok.vocab_size <= 200
    assert len({tok.pad_id, tok.sot_id, tok.eot_id}) == 3
    # the caption vocabulary is learnt whole: no unknowns, every word one token or a few
    ids = tok.encode_batch(captions[:200])
    unk = tok.tok.token_to_id("<unk>")
    assert not (ids == unk).any()


def test_encode_batch_layout(tok):
    ids = tok.encode_batch(TEXTS)
    assert ids.shape == (len(TEXTS), 16) and ids.dtype == np.int64
    eots = [check_row(r, tok) for r in ids]
    assert eots[1] == 1  # empty text: <sot> <eot> <pad>...
    assert eots[3] == 15  # truncated: the eot survives in the last slot
    assert eots[0] < 15
    # lower-casing and whitespace/punctuation splitting
    assert tok.encode("A RED Circle").tolist() == tok.encode("a red circle").tolist()
    assert tok.encode_batch([]).shape == (0, 16)
    assert tok.encode(TEXTS[0]).tolist() == ids[0].tolist()


def test_typed_special_tokens_do_not_leak(tok):
    row = tok.encode(TEXTS[4])
    check_row(row, tok)
    clean = tok.encode("a red circle left of a blue square")
    assert row.tolist() == clean.tolist()


def test_decode(tok):
    text = "a red circle left of a blue square"
    assert tok.decode(tok.encode(text)).split() == text.split()


def test_save_load_round_trip(tok, tmp_path):
    path = tok.save(tmp_path / "tokenizer.json")
    meta = json.loads(path.read_text())["mcad"]
    assert meta == {"context_length": 16, "sot_id": tok.sot_id, "eot_id": tok.eot_id,
                    "pad_id": tok.pad_id, "kind": "bpe"}
    for loaded in (Tokenizer.load(path), Tokenizer.load(tmp_path)):
        assert (loaded.vocab_size, loaded.context_length, loaded.sot_id, loaded.eot_id, loaded.pad_id,
                loaded.kind) == (tok.vocab_size, 16, tok.sot_id, tok.eot_id, tok.pad_id, "bpe")
        assert np.array_equal(loaded.encode_batch(TEXTS), tok.encode_batch(TEXTS))
    short = Tokenizer.load(path, context_length=8)
    ids = short.encode_batch(TEXTS)
    assert ids.shape == (len(TEXTS), 8)
    for r in ids:
        check_row(r, short)


def test_training_is_deterministic(captions, tok):
    again = train_bpe(captions, vocab_size=200, context_length=16)
    assert again.to_json() == tok.to_json()


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing"):
        Tokenizer.load(tmp_path / "nothing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    with pytest.raises(ValueError, match="bad.json"):
        Tokenizer.load(bad)


def test_no_torch_import():
    code = "import sys; import mcad.tokenizer; assert 'torch' not in sys.modules, 'torch imported'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
