"""Where things live: the one owner of the results location, the target names and the names of the
folders a run holds. Relative paths are the checkout's (the working folder a command runs in), never
the installed package's folder."""
from __future__ import annotations

from pathlib import Path

RESULTS_DIR = Path("benchmarks") / "results"  # committed summaries (markdown + JSON + plots)
RUNS_DIR = Path("runs")                        # what `make student` and friends write
TEACHERS_RUN = RUNS_DIR / "teachers"           # the embedded default's teachers and their cache

# inside a run folder runs/<name>/
EXPORT = "export"    # export/<target>/ (and <target>-bound/ with a gallery bound in)
BENCH = "bench"      # bench.{json,md,png} and bench-made artifacts
INDEX = "index"      # the default index folder of `mcad index`

# the export targets a user names (`make export TARGET=...`)
TARGETS = ("cpu", "snapdragon", "dimensity")


def export_dir(run: str | Path, target: str, bound: bool = False) -> Path:
    return Path(run) / EXPORT / (target + ("-bound" if bound else ""))


def bench_dir(run: str | Path) -> Path:
    return Path(run) / BENCH
