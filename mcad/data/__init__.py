"""Data loaders behind one spec: `load_corpus({"format": ..., ...}, split)`.

The spec and its resolution live in `mcad.data.spec` (the one place a spec becomes a Corpus): see
its doc for the formats and their keys. Re-exported here for the loader-level API (`mcad data check`).

Loaders import lazily, so `import mcad.data` stays light (no torch, no webdataset).
"""
from __future__ import annotations

from mcad.data.spec import (DEFAULT_SYNTH_ROOT, DEFAULT_WDS_SIZE, FORMATS, SYNTH_JSON, load_corpus,  # noqa: F401
                            load_pixels)
