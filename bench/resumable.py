"""A benchmark's rows kept in a JSON file as each one finishes, so that a rerun with the same
settings resumes where an interrupted one stopped (machines here start empty and runs are long)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def earlier_rows(path: Path | None, settings: dict) -> list[dict]:
    """The rows of ``path`` when it was written with these ``settings``, else none."""
    if not (path and path.exists()):
        return []
    earlier = json.loads(path.read_text())
    if earlier.get("settings") != settings:
        return []
    print(f"resuming: {len(earlier['rows'])} cells read from {path}", file=sys.stderr, flush=True)
    return earlier["rows"]


def save_rows(path: Path | None, settings: dict, rows: list[dict], **extra) -> None:
    """Every row so far (and ``extra`` keys), written through a temporary file and a rename."""
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps({"settings": settings, **extra, "rows": rows}, indent=1))
        partial.replace(path)
