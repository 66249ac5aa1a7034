"""Data flows one way (docs/interfaces.md, "Layers"): a stage imports only from mcad core and the
stages before it. Every import counts, function-level ones included (they hide cycles, they do
not remove them), and so does `python -m <module>` in a subprocess call.

    core -> distill -> quantize -> export -> device -> benchmarks --> cli
                                         \\-> search ------------/

core is mcad/ (its modules, models, data and configs): what every stage shares, the export
manifest (mcad.artifacts) and the host runtimes (mcad.runtimes) among them, so device and the
bench read exports without importing the export stage. distill/ holds the teachers' training,
the teacher cache and the student. search/ (photo index, search and the run's report) reads
exports and may bind a gallery into programs through the export stage; device and benchmarks
never import it, nor it them. mcad/cli.py dispatches to every command by module name."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# stage -> the stages directly before it
BEFORE = {"core": (), "distill": ("core",), "quantize": ("distill",), "export": ("quantize",),
          "device": ("export",), "benchmarks": ("device",), "search": ("export",),
          "cli": ("benchmarks", "search")}
PACKAGES = {"mcad.distill": "distill", "mcad.quantize": "quantize", "mcad.export": "export",
            "mcad.device": "device", "mcad.benchmarks": "benchmarks", "mcad.search": "search", "mcad.cli": "cli"}
FOLDERS = {"distill": "mcad.distill", "quantize": "mcad.quantize", "export": "mcad.export", "device": "mcad.device",
           "benchmarks": "mcad.benchmarks", "search": "mcad.search", "mcad": "mcad"}
UNPACKAGED = ("benchmarks/studies",)  # scripts beside their results, not part of the distribution


def allowed(stage: str) -> set[str]:
    out, todo = set(), list(BEFORE[stage])
    while todo:
        s = todo.pop()
        if s not in out:
            out.add(s)
            todo += BEFORE[s]
    return out | {stage}


def stage_of(module: str) -> str | None:
    """The stage of an mcad module name; None for anything outside mcad."""
    if module != "mcad" and not module.startswith("mcad."):
        return None
    for prefix, stage in PACKAGES.items():
        if module == prefix or module.startswith(prefix + "."):
            return stage
    return "core"


def modules():
    """(module name, file) of every Python file of the distribution."""
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            if any(path.is_relative_to(ROOT / u) for u in UNPACKAGED):
                continue
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield ".".join([package, *parts]), path


def imports(module: str, path: Path) -> list[tuple[str, int]]:
    """(imported mcad module, line) for every import in the file, at any depth."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the file's package
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            if base == "mcad" or node.module is None:  # `from mcad import artifacts`, `from . import x`
                out += [(f"{base}.{a.name}", node.lineno) for a in node.names]
            else:
                out.append((base, node.lineno))
        elif isinstance(node, (ast.List, ast.Tuple)):  # [sys.executable, "-m", "mcad.x.y", ...]
            vals = [e.value if isinstance(e, ast.Constant) else None for e in node.elts]
            out += [(v, node.lineno) for k, v in zip(vals, vals[1:]) if k == "-m" and isinstance(v, str)]
    return [(m, line) for m, line in out if stage_of(m) is not None]


def edges():
    """(from stage, to stage, where) for every import between two stages."""
    for module, path in modules():
        src = stage_of(module)
        for target, line in imports(module, path):
            dst = stage_of(target)
            if dst != src:
                yield src, dst, f"{path.relative_to(ROOT)}:{line} imports {target}"


def test_every_stage_file_is_seen():
    found = {stage_of(m) for m, _ in modules()}
    assert found == set(BEFORE), found
    assert "mcad.artifacts" in dict(modules()) and "mcad.runtimes" in dict(modules())


def test_imports_follow_the_data_flow():
    against = [f"{where} ({src} -> {dst}: {dst} is not before {src})"
               for src, dst, where in edges() if dst not in allowed(src)]
    assert not against, "\n".join(against)


def test_no_cycle_between_stages():
    graph: dict[str, set[str]] = {s: set() for s in BEFORE}
    for src, dst, _ in edges():
        graph[src].add(dst)

    def cycle_from(start):
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return path + [start]
                if nxt not in path:
                    stack.append((nxt, path + [nxt]))
        return None

    cycles = [c for c in map(cycle_from, graph) if c]
    assert not cycles, " | ".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_function_level_imports_and_subprocess_modules(tmp_path):
    """The walk finds what hid the old bench cycle: an import inside a function body, a module
    run with -m; and a relative import resolves to its package."""
    f = tmp_path / "x.py"
    f.write_text("def main():\n    from mcad.benchmarks.engine import run_bench\n"
                 "    from . import native\n"
                 "cmd = ['python', '-m', 'mcad.export.cli']\n")
    got = imports("mcad.device.x", f)
    assert sorted(m for m, _ in got) == ["mcad.benchmarks.engine", "mcad.device.native", "mcad.export.cli"]
    assert stage_of("mcad.benchmarks.engine") not in allowed("device")
