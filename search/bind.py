"""`mcad index ... bind=cpu|snapdragon|dimensity`: search programs that hold this index's gallery.

The index's stored embeddings are bound into ExecuTorch's (int8) and LiteRT's (fp32) search programs
as a constant weight (mcad.export.bound), which the runtime packs once at load: a query is then one
program call from token ids to the top-10 rows of the index, at about the cost of the text encoder
+ a flat scan or less, where a program that takes the gallery at run time costs several times that
(benchmarks/results/scan_forms.md and bound-*-local.md measure both). They are
written with their text encoders to `<index>/programs-<target>/` (an export folder with its manifest;
row i of a program's result is row i of the index, `paths.json`). A changed index is bound again
(`mcad index ... mode=add bind=cpu`); the manifest's `gallery_bound.sha256` says which rows a
program holds."""
from __future__ import annotations

from pathlib import Path

from mcad.search import store
from mcad.search.common import SearchError

from mcad.paths import TARGETS  # noqa: E402


def programs_folder(index_root: str | Path, target: str) -> Path:
    return Path(index_root) / f"programs-{target}"


def bind_programs(index_root: str | Path, target: str, run: str | Path | None = None,
                  progress: bool = True) -> dict:
    """Export the index's gallery bound into search programs; returns the export manifest (JSON)."""
    if target not in TARGETS:
        raise SearchError(f"bind={target}: expected one of {', '.join(TARGETS)}")
    root = Path(index_root)
    manifest = store.read_manifest(root)
    emb = manifest["files"].get("embeddings")
    if not emb:
        raise SearchError(f"{root}: the index keeps no embeddings (built with keep_embeddings=false): "
                          f"rebuild it with keep_embeddings=true to bind it")
    run = run or (manifest.get("student") or {}).get("run")
    if not run:
        raise SearchError(f"{root}: built from an exported image encoder, not a run: give run=runs/<name> to bind it")
    store.verify_file(root, emb)  # the rows the programs will hold are the ones the manifest names
    import dataclasses

    from mcad.export.cli import defaults
    from mcad.export.pipeline import export

    # the export defaults with mcad/configs/export.yaml's recipe over them, as `mcad export` takes them
    return export(dataclasses.replace(defaults(), target=target, run=run, gallery=str(root / emb["path"]),
                                      roles=("text", "search"), out=programs_folder(root, target), progress=progress))
