"""Where a campaign's time went: the flow's wall time against the sum of its compute stages.

    make run                                  # or: neuroal campaign ...
    .venv/bin/python bench/campaign.py [runs/campaign/results.json]

Compute stages are those the cells record: model load, calibration, allocation (NeuroAl's search),
prune, and evaluation (load, perplexity per corpus, zero-shot tasks). The rest of the flow's time
is orchestration: Prefect task and state handling, checkpoint and metrics writing, DVC tracking,
MLflow logging. Stages served from a cache count as they were measured when first computed, so
run this after a fresh campaign.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def cell_compute(entry: dict) -> tuple[float, float]:
    """(prune-side seconds, evaluation seconds) recorded for one cell or baseline."""
    metrics = entry["metrics"]
    manifest = metrics.get("checkpoint") or {}
    return sum(manifest.get("timings", {}).values()), sum(metrics.get("timings", {}).values())


def main() -> None:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/campaign/results.json")
    results = json.loads(path.read_text())
    rows = [(c["name"], *cell_compute(c)) for c in results["cells"] + results["baselines"]]
    print(f"{'cell':48} {'prune s':>9} {'eval s':>8}")
    for name, prune, evaluation in rows:
        print(f"{name:48} {prune:9.1f} {evaluation:8.1f}")
    compute = sum(p + e for _, p, e in rows)
    wall = results["seconds"]
    print(f"campaign flow {wall:.1f} s; compute {compute:.1f} s; "
          f"orchestration {wall - compute:.1f} s ({100 * (wall - compute) / wall:.1f}%)")


if __name__ == "__main__":
    main()
