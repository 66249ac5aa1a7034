"""The export manifest (`<export folder>/manifest.json`, docs/interfaces.md): the one description
of exported artifacts. mcad.export writes it; the device harness, the bench, search and the report
read it through `load_manifest`, so no reader guesses at keys.

`version` changes whenever a key's meaning changes; a manifest of another (or no) version is
refused with the command that rebuilds it, never half-read."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_VERSION = 2  # 1: the unversioned manifests before the type existed
MANIFEST = "manifest.json"
# qnn: QNN context binaries compiled by Qualcomm AI Hub; no host runtime opens them
RUNTIMES = ("executorch", "litert", "onnxruntime", "qnn")
ROLES = ("text", "image", "search")
DYNAMIC = "N"  # a dimension the artifact takes at any size


GALLERY_LAYOUTS = ("rows", "columns")  # a search program's gallery input: [N, D] or [D, N]


def gallery_input(rows, layout: str | None):
    """A search program's gallery input made from the gallery's unit rows [N, D], in the layout
    the program takes (its notes.gallery_layout; absent = rows): columns is the transpose, made once
    when the gallery is given, so the runtime scans it as a plain matrix product (export.programs.SCANS)."""
    import numpy as np

    if layout in (None, "rows"):
        return rows
    if layout != "columns":
        raise ManifestError(f"gallery layout {layout!r}: expected one of {', '.join(GALLERY_LAYOUTS)}")
    return np.ascontiguousarray(np.asarray(rows).T)


class ManifestError(ValueError):
    """A manifest that cannot be read as this version of the type (one line, names the file)."""


def _need(d: dict, key: str, kind, where: str):
    if not isinstance(d, dict):
        raise ManifestError(f"{where}: expected a JSON object")
    if key not in d:
        raise ManifestError(f"{where}: missing key {key!r} (see docs/interfaces.md)")
    v = d[key]
    if kind is not None and (not isinstance(v, kind) or (isinstance(v, bool) and kind is int)):
        raise ManifestError(f"{where}: {key}={v!r} is not a {getattr(kind, '__name__', kind)}")
    return v


def _opt(d: dict, key: str, kind, where: str, default=None):
    return default if d.get(key) is None else _need(d, key, kind, where)


@dataclass
class Tensor:
    """One input or output as the runtime reports it: shape entries are ints or "N" (dynamic)."""
    name: str
    shape: list
    dtype: str
    quantization: dict | None = None  # {"scale": float, "zero_point": int} of an integer tensor

    def to_json(self) -> dict:
        d: dict[str, Any] = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}
        if self.quantization is not None:
            d["quantization"] = dict(self.quantization)
        return d

    @classmethod
    def from_json(cls, d: dict, where: str) -> "Tensor":
        shape = _need(d, "shape", list, where)
        if any(not (isinstance(s, int) and not isinstance(s, bool)) and s != DYNAMIC for s in shape):
            raise ManifestError(f"{where}: shape {shape} (entries are ints or {DYNAMIC!r})")
        return cls(_need(d, "name", str, where), shape, _need(d, "dtype", str, where),
                   _opt(d, "quantization", dict, where))


@dataclass
class Artifact:
    """One exported program file, named relative to its manifest's folder."""
    name: str            # text_encoder | image_encoder | search
    role: str            # text | image | search
    runtime: str         # RUNTIMES
    backend: str         # xnnpack | qnn | mediatek | onnx | tflite
    file: str
    bytes: int
    sha256: str
    quantization: str
    inputs: list[Tensor]
    outputs: list[Tensor]
    k: int | None = None               # search programs: how many results
    notes: dict = field(default_factory=dict)  # gallery_rows, soc, platform, note, hub_job, ...
    parity_pass: bool | None = None    # the export's parity verdict (None: not run here)
    # set when read from a manifest, never written: where the file is and which export it is from
    root: Path | None = field(default=None, repr=False, compare=False)
    target: str = field(default="", repr=False, compare=False)

    @property
    def path(self) -> Path:
        return (self.root / self.file) if self.root is not None else Path(self.file)

    @property
    def label(self) -> str:
        return f"{self.name}[{self.runtime}/{self.backend or '-'}/{self.quantization or '?'}]"

    def input_shape(self, i: int) -> list | None:
        return list(self.inputs[i].shape) if i < len(self.inputs) else None

    def gallery_rows(self) -> tuple[int | None, int | None]:
        """(min, max) gallery rows a search program takes (notes.gallery_rows); None = open."""
        rows = self.notes.get("gallery_rows")
        if isinstance(rows, (list, tuple)) and len(rows) == 2:
            return tuple(None if r is None else int(r) for r in rows)  # type: ignore[return-value]
        return (None, None)

    @property
    def gallery_layout(self) -> str:
        """rows ([N, D]) or columns ([D, N]): how this search program takes its gallery."""
        return str(self.notes.get("gallery_layout") or "rows")

    def to_json(self) -> dict:
        d: dict[str, Any] = {"name": self.name, "role": self.role, "runtime": self.runtime, "backend": self.backend,
                             "file": self.file, "bytes": self.bytes, "sha256": self.sha256,
                             "quantization": self.quantization, "inputs": [t.to_json() for t in self.inputs],
                             "outputs": [t.to_json() for t in self.outputs]}
        if self.k is not None:
            d["k"] = self.k
        if self.notes:
            d["notes"] = dict(self.notes)
        if self.parity_pass is not None:
            d["parity_pass"] = self.parity_pass
        return d

    @classmethod
    def from_json(cls, d: dict, where: str) -> "Artifact":
        role, runtime = _need(d, "role", str, where), _need(d, "runtime", str, where)
        if role not in ROLES:
            raise ManifestError(f"{where}: unknown role {role!r} ({', '.join(ROLES)})")
        if runtime not in RUNTIMES:
            raise ManifestError(f"{where}: unknown runtime {runtime!r} ({', '.join(RUNTIMES)})")
        file = _need(d, "file", str, where)
        if not file or Path(file).name != file:
            raise ManifestError(f"{where}: file={file!r} must be a name in the manifest's folder")
        return cls(name=_need(d, "name", str, where), role=role, runtime=runtime,
                   backend=_need(d, "backend", str, where), file=file, bytes=_need(d, "bytes", int, where),
                   sha256=_need(d, "sha256", str, where), quantization=_need(d, "quantization", str, where),
                   inputs=[Tensor.from_json(t, f"{where}.inputs[{i}]")
                           for i, t in enumerate(_need(d, "inputs", list, where))],
                   outputs=[Tensor.from_json(t, f"{where}.outputs[{i}]")
                            for i, t in enumerate(_need(d, "outputs", list, where))],
                   k=_opt(d, "k", int, where), notes=_opt(d, "notes", dict, where, {}),
                   parity_pass=_opt(d, "parity_pass", bool, where))


@dataclass
class ExportManifest:
    """What one export wrote into its folder (docs/interfaces.md, "Export folder")."""
    target: str                        # cpu | snapdragon | dimensity | bench
    run: str | None                    # the run folder exported (None: not a run's student)
    model: str                         # model config name
    embed_dim: int
    context_length: int                # 0: no text tower
    image_size: int                    # 0: no image tower
    image_mean: list
    image_std: list
    artifacts: list[Artifact]
    skipped: list[dict] = field(default_factory=list)     # [{"artifact", "reason"}]
    student_sha256: str | None = None  # sha256 of the run's student.safetensors
    tokenizer: str | None = None       # file names in the folder
    golden: str | None = None
    created: str = ""
    soc: str | None = None
    precision: str = "int8"
    keep_fp32: dict = field(default_factory=dict)         # {backend: [what stays float]}
    calibration: dict | None = None
    parity: dict | None = None         # mcad.export.parity's record (None: not run)
    versions: dict = field(default_factory=dict)
    preprocess: dict | None = None     # how image files become the image input (mcad.preprocess.record: size,
                                       # mean/std, resize_mode square|shortest|squash); None: square at image_size
    teachers: dict | None = None       # the run's teachers: {"specs": {role: "source:path"}, "sha256": {file: hash}}
    version: int = MANIFEST_VERSION
    path: Path | None = field(default=None, repr=False, compare=False)  # where it was read from

    @property
    def root(self) -> Path:
        return self.path.parent if self.path is not None else Path(".")

    def _file(self, name: str | None) -> Path | None:
        return self.root / name if name and (self.root / name).exists() else None

    @property
    def view(self):
        """How image files are decoded for the image encoder (mcad.data.stream.View)."""
        from mcad.preprocess import view_of_record

        return view_of_record(self.preprocess, self.image_size)

    @property
    def tokenizer_path(self) -> Path | None:
        return self._file(self.tokenizer)

    @property
    def golden_path(self) -> Path | None:
        return self._file(self.golden)

    def golden_ids(self):
        """The golden token ids (int64 [Q, L]) the export stored, or None."""
        if self.golden_path is None:
            return None
        import numpy as np

        with np.load(self.golden_path) as z:
            return np.asarray(z["ids"], dtype=np.int64) if "ids" in z.files else None

    def rebuild_command(self) -> str:
        bound = next((a.notes["gallery_bound"] for a in self.artifacts if a.notes.get("gallery_bound")), None)
        if bound:  # an export with a gallery bound in is made again with that gallery
            return (f"`mcad export target={self.target}" + (f" run={self.run}" if self.run else "")
                    + f" gallery={bound.get('source')}` (or `mcad index ... bind={self.target}`)")
        return rebuild_command(self.target, self.run)

    def to_json(self) -> dict:
        return {"version": self.version, "target": self.target, "run": self.run, "model": self.model,
                "student_sha256": self.student_sha256, "created": self.created, "embed_dim": self.embed_dim,
                "context_length": self.context_length, "image_size": self.image_size,
                "image_mean": list(self.image_mean), "image_std": list(self.image_std),
                "tokenizer": self.tokenizer, "golden": self.golden, "soc": self.soc, "precision": self.precision,
                "keep_fp32": self.keep_fp32, "calibration": self.calibration,
                "artifacts": [a.to_json() for a in self.artifacts], "skipped": list(self.skipped),
                "parity": self.parity, "versions": self.versions, "preprocess": self.preprocess,
                "teachers": self.teachers}

    @classmethod
    def from_json(cls, d: Any, path: str | Path | None = None) -> "ExportManifest":
        where = str(path or "export manifest")
        if not isinstance(d, dict):
            raise ManifestError(f"{where}: an export manifest is a JSON object")
        target = d.get("target") if isinstance(d.get("target"), str) else (Path(where).parent.name or "cpu")
        run = d.get("run") if isinstance(d.get("run"), str) else None
        if d.get("version") != MANIFEST_VERSION:
            raise ManifestError(f"{where}: export manifest version {d.get('version', 'absent')} (this mcad "
                                f"reads version {MANIFEST_VERSION}); rebuild it: {rebuild_command(target, run)}")
        root = Path(path).parent if path is not None else None
        arts = [Artifact.from_json(a, f"{where}: artifacts[{i}]")
                for i, a in enumerate(_need(d, "artifacts", list, where))]
        for a in arts:
            a.root, a.target = root, target
        skipped = _opt(d, "skipped", list, where, [])
        if any(not isinstance(s, dict) or not {"artifact", "reason"} <= set(s) for s in skipped):
            raise ManifestError(f"{where}: skipped entries are {{'artifact', 'reason'}} objects")
        return cls(target=_need(d, "target", str, where), run=run, model=_opt(d, "model", str, where, "?"),
                   embed_dim=_need(d, "embed_dim", int, where), context_length=_need(d, "context_length", int, where),
                   image_size=_need(d, "image_size", int, where), image_mean=_opt(d, "image_mean", list, where, []),
                   image_std=_opt(d, "image_std", list, where, []), artifacts=arts, skipped=skipped,
                   student_sha256=_opt(d, "student_sha256", str, where), tokenizer=_opt(d, "tokenizer", str, where),
                   golden=_opt(d, "golden", str, where), created=_opt(d, "created", str, where, ""),
                   soc=_opt(d, "soc", str, where), precision=_opt(d, "precision", str, where, "int8"),
                   keep_fp32=_opt(d, "keep_fp32", dict, where, {}), calibration=_opt(d, "calibration", dict, where),
                   parity=_opt(d, "parity", dict, where), versions=_opt(d, "versions", dict, where, {}),
                   preprocess=_opt(d, "preprocess", dict, where), teachers=_opt(d, "teachers", dict, where),
                   path=Path(path) if path is not None else None)


def rebuild_command(target: str, run: str | None) -> str:
    return f"`make export TARGET={target}" + (f" RUN={run}`" if run else "`")


def manifest_path(path: str | Path) -> Path:
    path = Path(path)
    return path / MANIFEST if path.is_dir() else path


def verify_artifact(m: ExportManifest, a: Artifact, check_hash: bool = True) -> str | None:
    """The one check of an exported file against its manifest (search, index and the bench use it):
    present, and (check_hash) of the sha256 the manifest recorded. A file that is not is one line
    naming it and the command that rebuilds the export. Returns the sha256 computed (None unchecked)."""
    from mcad.io import sha256_file

    where = m.path or MANIFEST
    if not a.path.is_file():
        raise FileNotFoundError(f"{a.path}: artifact listed in {where} is missing (rebuild: {m.rebuild_command()})")
    if not check_hash:
        return None
    got = sha256_file(a.path)
    if got != a.sha256:
        raise ManifestError(f"{a.path}: sha256 differs from {where} (the file changed after export or is damaged); "
                            f"rebuild: {m.rebuild_command()}")
    return got


def load_manifest(path: str | Path, verify: bool = False) -> ExportManifest:
    """The manifest of an export folder (or its manifest.json), with every listed file present;
    `verify` also checks each file's sha256 (`verify_artifact`)."""
    from mcad.io import read_json

    path = manifest_path(path)
    m = ExportManifest.from_json(read_json(path), path)
    for a in m.artifacts:
        verify_artifact(m, a, check_hash=verify)
    return m


def parity_failures(m: ExportManifest) -> list[str]:
    """File names of the artifacts whose parity failed: each artifact's own verdict (its
    `parity_pass`, or the parity section's `artifacts.<file>.pass`); where the section's overall
    verdict is false and no artifact carries one, every artifact of the export."""
    section = m.parity or {}
    per = section.get("artifacts") if isinstance(section.get("artifacts"), dict) else {}
    failed = [a.file for a in m.artifacts
              if a.parity_pass is False or (isinstance(per.get(a.file), dict) and per[a.file].get("pass") is False)]
    if not failed and section.get("pass") is False:
        failed = [a.file for a in m.artifacts]
    return failed


PROGRAM_SUFFIXES = (".pte", ".onnx", ".tflite", ".bin")  # what an export folder's programs are named


def unfinished_export(folder: Path) -> list[str]:
    """Program files of an export folder that has no manifest (an export killed before it wrote
    one, or files copied in): empty when the folder has a manifest or holds no program."""
    folder = Path(folder)
    if not folder.is_dir() or (folder / MANIFEST).exists():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix in PROGRAM_SUFFIXES)


def find_manifests(run: str | Path, target: str | None = None) -> list[Path]:
    """`<run>/export/*/manifest.json` (one target if given), sorted."""
    pattern = f"export/{target}/{MANIFEST}" if target else f"export/*/{MANIFEST}"
    return sorted(Path(run).glob(pattern))
