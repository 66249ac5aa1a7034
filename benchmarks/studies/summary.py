"""One way a benchmark module publishes what it measured: a markdown table and the JSON behind it,
each naming the command, date and machine, printed and written to `results` (none: printed only)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable


def publish(module: str, argv: list[str] | None, res: dict, markdown: Callable[[dict, dict], str],
            results: str | None, stem: str) -> dict:
    """`res` rendered by `markdown(res, meta)`; written as `<results>/<stem>.{md,json}`. Returns meta."""
    from mcad.io import machine, now_iso, write_json

    meta = {"command": f"python {module} " + " ".join(argv or []), "date": now_iso(), "machine": machine()}
    md = markdown(res, meta)
    print(md)
    if str(results).lower() not in ("none", ""):
        dest = Path(results)
        dest.mkdir(parents=True, exist_ok=True)
        write_json(dest / f"{stem}.json", {"meta": meta, **res})
        (dest / f"{stem}.md").write_text(md)
    return meta
