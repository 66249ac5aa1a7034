"""What gets benchmarked: the run's trained student (its export, or artifacts made here while no
export exists), the mobile-size student config (random weights), and the peers: the CLIP ViT-B/32
text tower (63M params) and a MobileViT-small image tower (random weights, transformers).

Each subject carries export-manifest artifacts (docs/interfaces.md) plus the inputs its jobs need:
token ids for its encoder, and the tokenizer whose cost is timed as the `tokenize` stage."""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks_unused import *  # noqa
