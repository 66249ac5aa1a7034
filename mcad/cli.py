"""`mcad <command> [args] [key=value ...]`: one entry point whose commands mirror the Make targets.

Each command lives in its stage's module as `main(argv) -> int`; this file only dispatches, so a
stage's dependencies (ExecuTorch, LiteRT, faiss...) are imported only when that command runs."""
from __future__ import annotations

import importlib
import logging
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("mcad.data.cli", "make the synthetic benchmark (or check a data set) and report its ceiling"),
    "teachers": ("mcad.distill.teachers", "train the dual and fusion teachers on the embedded default"),
    "eval": ("mcad.evaluate", "retrieval R@1/5/10 + RSUM of a checkpoint (and fusion re-ranking)"),
    "cache": ("mcad.distill.cache", "run the teachers once over a data set and store their outputs"),
    "student": ("mcad.distill.recipe", "distill the student (MCAD) and evaluate it"),
    "ablation": ("mcad.distill.ablation", "no-KD / dual-KD / single-KD / MCAD over seeds"),
    "export": ("mcad.export.cli", "quantize and export the student for a target (cpu, snapdragon, dimensity)"),
    "bench": ("mcad.benchmarks.cli", "search latency and running memory on a device, against budgets"),
    "index": ("mcad.search.index", "build or extend a faiss index over a gallery"),
    "search": ("mcad.search.query", "query an index with text"),
    "report": ("mcad.search.report", "write the HTML report of a run"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: mcad <command> [options] [key=value ...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"mcad: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return int(module.main(rest) or 0)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as e:
        # Bad input is one clear line, not a traceback (MCAD_DEBUG=1 shows the traceback).
        import os

        if os.environ.get("MCAD_DEBUG"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"mcad {name}: error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C: one line (training says where its checkpoint is), 128 + SIGINT
        print(f"mcad {name}: interrupted" + (f": {e}" if str(e) else ""), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
