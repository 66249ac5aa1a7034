"""Read an export manifest (`runs/<name>/export/<target>/manifest.json`, docs/interfaces.md)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from mcad.io import read_json, sha256_file

RUNTIMES = ("executorch", "litert", "onnxruntime")
ROLES = ("text", "image", "search")
KNOWN_KEYS = {"name", "role", "runtime", "backend", "file", "bytes", "sha256", "quantization", "inputs", "outputs"}
SUFFIX_RUNTIME = {".pte": "executorch", ".tflite": "litert", ".onnx": "onnxruntime"}


@dataclass
class Artifact:
    name: str
    role: str          # text | image | search
    runtime: str       # executorch | litert | onnxruntime
    path: Path
    backend: str = ""
    quantization: str = ""
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    bytes: int = 0
    sha256: str = ""
    target: str = ""
    extra: dict = field(default_factory=dict)  # other keys of the manifest entry (k, notes, parity_pass...)

    def gallery_rows(self) -> tuple[int | None, int | None]:
        """(min, max) gallery rows a search program accepts (manifest notes.gallery_rows), None = open."""
        rows = (self.extra.get("notes") or {}).get("gallery_rows") if isinstance(self.extra.get("notes"), dict) else None
        if isinstance(rows, (list, tuple)) and len(rows) == 2:
            return (int(rows[0]) if rows[0] is not None else None, int(rows[1]) if rows[1] is not None else None)
        return (None, None)

    @property
    def label(self) -> str:
        q = self.quantization or "?"
        return f"{self.name}[{self.runtime}/{self.backend or '-'}/{q}]"

    def input_shape(self, i: int) -> list | None:
        if i < len(self.inputs):
            return self.inputs[i].get("shape")
        return None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


@dataclass
class ExportManifest:
    path: Path
    target: str
    embed_dim: int
    context_length: int
    image_size: int
    tokenizer: Path | None
    golden: Path | None
    artifacts: list[Artifact]
    skipped: list = field(default_factory=list)
    raw: dict = field(default_factory=dict)

    @property
    def root(self) -> Path:
        return self.path.parent


def _need(d: dict, key: str, where: str):
    if key not in d:
        raise ValueError(f"{where}: missing key {key!r} (see docs/interfaces.md)")
    return d[key]


def load_manifest(path: str | Path, verify: bool = False) -> ExportManifest:
    """Parse and check a manifest; files are resolved relative to its folder. `verify` checks hashes."""
    path = Path(path)
    if path.is_dir():
        path = path / "manifest.json"
    m = read_json(path)
    if not isinstance(m, dict):
        raise ValueError(f"{path}: export manifest must be a JSON object")
    root = path.parent
    arts = []
    for i, a in enumerate(_need(m, "artifacts", str(path))):
        where = f"{path}: artifacts[{i}]"
        file = Path(_need(a, "file", where))
        fpath = file if file.is_absolute() else root / file
        runtime = a.get("runtime") or SUFFIX_RUNTIME.get(fpath.suffix, "")
        role = _need(a, "role", where)
        if runtime not in RUNTIMES:
            raise ValueError(f"{where}: unknown runtime {runtime!r} ({', '.join(RUNTIMES)})")
        if role not in ROLES:
            raise ValueError(f"{where}: unknown role {role!r} ({', '.join(ROLES)})")
        if not fpath.exists():
            raise FileNotFoundError(f"{fpath}: artifact listed in {path} is missing")
        if verify and a.get("sha256") and sha256_file(fpath) != a["sha256"]:
            raise ValueError(f"{fpath}: sha256 does not match {path}")
        arts.append(Artifact(name=a.get("name", fpath.stem), role=role, runtime=runtime, path=fpath,
                             backend=a.get("backend", ""), quantization=str(a.get("quantization", "")),
                             inputs=list(a.get("inputs") or []), outputs=list(a.get("outputs") or []),
                             bytes=int(a.get("bytes") or fpath.stat().st_size), sha256=a.get("sha256", ""),
                             target=m.get("target", ""),
                             extra={k: v for k, v in a.items() if k not in KNOWN_KEYS}))
    tok = m.get("tokenizer")
    gold = m.get("golden")
    return ExportManifest(
        path=path, target=str(m.get("target", root.name)), embed_dim=int(_need(m, "embed_dim", str(path))),
        context_length=int(_need(m, "context_length", str(path))), image_size=int(m.get("image_size", 0) or 0),
        tokenizer=(root / tok) if tok and (root / tok).exists() else None,
        golden=(root / gold) if gold and (root / gold).exists() else None,
        artifacts=arts, skipped=list(m.get("skipped") or []), raw=m)


def find_manifests(run: str | Path, target: str | None = None) -> list[Path]:
    """`runs/<name>/export/*/manifest.json` (one target if given), sorted."""
    run = Path(run)
    pat = f"export/{target}/manifest.json" if target else "export/*/manifest.json"
    return sorted(run.glob(pat))


def golden_captions(manifest: ExportManifest) -> list[str] | None:
    """The captions stored with the export's golden ids, if any."""
    if manifest.golden is None:
        return None
    import numpy as np

    with np.load(manifest.golden) as z:
        if "captions" in z.files:
            return [str(c) for c in z["captions"].ravel()]
    return None


def golden_ids(manifest: ExportManifest):
    """Token ids stored with the export (golden.npz), if any: int64 [Q, L] or None."""
    if manifest.golden is None:
        return None
    import numpy as np

    with np.load(manifest.golden) as z:
        for key in ("ids", "text_ids", "token_ids", "input_ids"):
            if key in z.files:
                ids = np.asarray(z[key]).astype(np.int64)
                return ids.reshape(-1, ids.shape[-1])
    return None
