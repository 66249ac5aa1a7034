"""The export's run -> check steps: every artifact run in its real runtime on held-out data, and a
verdict for each artifact of its own (export.parity's bars):
- an encoder: cosine to the eager fp32 student on every held-out input (its worst inputs named),
  and R@1 of its embeddings against the fp32 embeddings of the other tower, so a text encoder is
  judged by itself, not by the image encoder it happens to ship beside;
- a search program: its top-k against brute force with the same runtime's text encoder's query;
- each runtime's pair (its text x its image encoder, what a phone index and its queries use):
  R@1 against fp32, gating the export as before, without failing the encoders that pass alone."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mcad.artifacts import gallery_input
from mcad.export import parity as P
from mcad.export.backends.common import Built, eager_embed
from mcad.export.programs import INPUT_NAMES, SEARCH_K


@dataclass
class Heldout:
    """The test split the artifacts are checked on, and what the eager fp32 student makes of it."""
    test: Any                      # quantize.calib.Samples: every caption of each test image
    ref: dict[str, np.ndarray]     # eager fp32 embeddings: {"text": [M, D], "image": [N, D]}
    q_idx: np.ndarray              # the captions the search programs are queried with
    gallery: np.ndarray            # the search programs' gallery: fp32 image embeddings [N, D]

    @classmethod
    def of(cls, test, encoders: dict, queries: int, search: bool) -> "Heldout":
        ids, px = torch.as_tensor(test.ids), torch.as_tensor(test.pixels)
        ref = {"text": eager_embed(encoders["text"], ids), "image": eager_embed(encoders["image"], px)}
        # search inputs: queries spread over the captions, gallery = fp32 image embeddings
        n_q = max(1, min(queries, len(ids)))
        q_idx = np.linspace(0, len(ids) - 1, n_q).round().astype(int)
        gallery = ref["image"].astype(np.float32)
        if search and len(gallery) < SEARCH_K:
            raise ValueError(f"{test.source}: {len(gallery)} test images, the search program's parity "
                             f"needs >= {SEARCH_K}: give a data set with more, or roles=text,image")
        return cls(test, ref, q_idx, gallery)

    def inputs(self, role: str, layout: str | None = None, bound: bool = False) -> list[list[np.ndarray]]:
        """The held-out inputs of a program; a search program's gallery in its `layout`, none when
        the program holds it (`bound`)."""
        if role == "text":
            return [[self.test.ids[i:i + 1]] for i in range(len(self.test.ids))]
        if role == "image":
            return [[self.test.pixels[i:i + 1]] for i in range(len(self.test.pixels))]
        if bound:
            return [[self.test.ids[i:i + 1]] for i in self.q_idx]
        g = gallery_input(self.gallery, layout)
        return [[self.test.ids[i:i + 1], g] for i in self.q_idx]


def run_artifacts(artifacts: list[Built], held: Heldout) -> None:
    """Every artifact this machine can run, in its real runtime, on the held-out inputs."""
    from mcad.runtimes import HOST_RUNTIMES, ExecuTorchWorker, run_artifact

    with ExecuTorchWorker() as worker:  # one child process for every .pte (started when needed)
        for a in artifacts:
            if a.runtime in HOST_RUNTIMES:
                bound = "gallery_bound" in a.notes
                a.outputs, a.meta = run_artifact(a.path, held.inputs(a.role, a.notes.get("gallery_layout"), bound),
                                                 a.runtime, names=INPUT_NAMES[a.role][:1 if bound else None],
                                                 worker=worker)


def judge(artifacts: list[Built], held: Heldout, bound_rows: np.ndarray | None, simulated: dict) -> dict:
    """The manifest's parity section: each artifact's record and verdict, each runtime pair's
    retrieval, the eager simulations, and `pass` (every artifact and every pair)."""
    from mcad.retrieval import retrieval_metrics

    test, ref = held.test, held.ref
    c2i = test.caption_to_image
    fp = retrieval_metrics(ref["image"] @ ref["text"].T, c2i)
    out: dict[str, Any] = {"reference": "eager fp32 student", "data": test.source,
                           "n_images": int(len(test.pixels)), "n_captions": int(len(test.ids)),
                           "bars": dict(P.BARS), "fp32": {k: round(v, 2) for k, v in fp.items()},
                           "artifacts": {}, "retrieval": {}, "simulated": {}}
    emb: dict[str, dict[str, np.ndarray]] = {}
    for a in artifacts:
        rec: dict[str, Any] = {"role": a.role, "group": a.notes["group"]}
        if a.outputs is None:
            rec.update({"pass": None, "note": "not run here (needs the device)"})
        elif a.role in ("text", "image"):
            e = np.concatenate([o[0] for o in a.outputs]).astype(np.float32)
            emb.setdefault(a.notes["group"], {})[a.role] = e
            rec.update(P.encoder_check(e, a.role, ref, c2i, fp))
        out["artifacts"][a.path.name] = rec
    for a in artifacts:  # a search program is checked with its runtime's own text encoder's queries
        if a.outputs is not None and a.role == "search":
            s = _search(a, held, emb.get(a.notes["group"], {}).get("text"), bound_rows)
            out["artifacts"][a.path.name].update({"search": s, "pass": s["pass"]})
    for group, e in emb.items():
        if "text" in e and "image" in e:
            out["retrieval"][group] = P.retrieval_check(e["image"], e["text"], c2i, fp)
    for name, e in simulated.items():
        rec = {r: P.cosine_stats(v, ref[r]) for r, v in e.items()}
        if "text" in e and "image" in e:
            rec["retrieval"] = P.retrieval_check(e["image"], e["text"], c2i, fp)
        out["simulated"][name] = rec
    out["pass"] = bool(all(r.get("pass") is not False for r in out["artifacts"].values())
                       and all(r["pass"] for r in out["retrieval"].values()))
    return out


def _search(a: Built, held: Heldout, text: np.ndarray | None, bound_rows: np.ndarray | None) -> dict:
    scores = np.concatenate([o[0] for o in a.outputs]).astype(np.float32)
    idx = np.concatenate([o[1] for o in a.outputs]).astype(np.int64)
    bound = a.notes.get("gallery_bound")
    return P.search_check(idx, scores, text[held.q_idx] if text is not None else None, held.ref["text"][held.q_idx],
                          bound_rows if bound else held.gallery, shared_query=a.notes["group"] != "tflite_full",
                          int8_gallery=bool(bound) and bound["dtype"] == "int8")
