"""Shared fixtures: a small synthetic benchmark and a run folder with a (briefly trained) student."""
from __future__ import annotations

import json
import os
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")
# what mcad keeps per user (the image scan, mcad.data.stream) goes to a folder of this session, not ~/.cache
os.environ.setdefault("MCAD_CACHE_DIR", tempfile.mkdtemp(prefix="mcad-test-cache-"))

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """data root of a small synthetic benchmark (Karpathy JSON + images)."""
    from mcad.data.synthetic import generate

    root = tmp_path_factory.mktemp("synth")
    generate(root, seed=0, n_train=240, n_val=40, n_test=100, progress=False)
    return root


@pytest.fixture(scope="session")
def synth_test(synth_root):
    """(pixels uint8 [N,3,64,64], Corpus) of the small benchmark's test split."""
    from mcad.data.images import load_images
    from mcad.data.karpathy import load_karpathy

    corpus = load_karpathy(synth_root / "dataset_synth.json", split="test")
    return load_images(corpus, 64, progress=False)


@pytest.fixture(scope="session")
def tokenizer(synth_root):
    from mcad.data.karpathy import load_karpathy
    from mcad.tokenizer import train_bpe

    corpus = load_karpathy(synth_root / "dataset_synth.json", split="train")
    return train_bpe(corpus.captions, vocab_size=256, context_length=24)


def make_run(path, tokenizer, model_name: str = "student-tiny", seed: int = 0, data=None):
    """A run folder as `make student` writes it, with a randomly initialised student; with `data`,
    a manifest recording that it was trained on it (what export calibrates on by default)."""
    from mcad.models.checkpoint import save_model
    from mcad.models.registry import create_model, with_tokenizer

    torch.manual_seed(seed)
    model = create_model(model_name, **with_tokenizer({}, tokenizer)).eval()
    path.mkdir(parents=True, exist_ok=True)
    save_model(model, path / "student.safetensors")
    tokenizer.save(path / "tokenizer.json")
    if data is not None:
        from mcad.data.spec import DATA_DEFAULTS

        record = {"kind": "run", "config": {"name": path.name, "data": {**DATA_DEFAULTS, "root": str(data)}}}
        (path / "manifest.json").write_text(json.dumps(record, indent=1))
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tokenizer):
    """runs/<name>/ with student.safetensors (+config) and tokenizer.json; random weights."""
    return make_run(tmp_path_factory.mktemp("run") / "tiny", tokenizer)


@pytest.fixture(scope="session")
def teachers(synth_root, tmp_path_factory):
    """Both teachers, trained for two steps (the real recipe, tiny budgets)."""
    from mcad.distill.teachers import main

    out = tmp_path_factory.mktemp("teachers")
    assert main([f"data={synth_root}", f"out={out}", "dual.steps=2", "fusion.steps=2", "dual.batch_size=16",
                 "fusion.batch_size=8", "threads=1", "eval.rerank_k=4"]) == 0
    return out


@pytest.fixture(autouse=True)
def _faiss_threads_restored():
    """faiss's OpenMP thread count is process-global and the on-device runner's scorer sets it (one
    thread: a phone's search is single-query) when a test runs it in process; exact search over
    near-tied embeddings (a 2-step teacher's) ranks ties by the threads' rounding, so the next test
    would see other candidate lists. Each test gets the count it started with."""
    try:
        import faiss
    except ImportError:
        yield
        return
    before = faiss.omp_get_max_threads()
    yield
    faiss.omp_set_num_threads(before)
