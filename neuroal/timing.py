"""Stage timings recorded into manifests and metrics."""

from __future__ import annotations

import contextlib
import time


@contextlib.contextmanager
def timed(timings: dict[str, float], stage: str):
    """Record the wall time of the ``with`` body as ``timings[stage]`` (seconds, ms precision)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = round(time.perf_counter() - start, 3)
