"""Does a new user's first campaign start? Runs a one-cell campaign N times, each with a fresh
``PREFECT_HOME`` (so Prefect starts its temporary server from scratch) and no ``PREFECT_API_URL``,
and prints whether it started and how long it took.

    .venv/bin/python bench/first_run.py [--runs 5] [--model smollm2-135m]

The cell is small (uniform magnitude at 0.5, no evaluation, no DVC) so that the time is mostly the
server's start and the flow's orchestration. Run it with the cores as busy as a user's would be.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def one_run(model: str, folder: Path) -> tuple[int, float, str]:
    """(exit code, seconds, last line of stderr) of one campaign in ``folder``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(folder / "prefect-home")
    (folder / "params.yaml").write_text((REPO / "params.yaml").read_text())
    command = [str(REPO / ".venv" / "bin" / "neuroal"), "-q", "campaign", "--models", model, "--methods", "magnitude",
               "--top-ups", "uniform", "--sparsities", "0.5", "--ppl", "none", "--tasks", "none", "--no-dvc",
               "--out", str(folder / "runs")]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
    lines = done.stderr.strip().splitlines()
    return done.returncode, time.perf_counter() - start, lines[-1] if lines else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()
    started = 0
    for index in range(args.runs):
        with tempfile.TemporaryDirectory() as folder:
            code, seconds, last = one_run(args.model, Path(folder))
        started += code == 0
        print(f"run {index + 1}: exit {code} in {seconds:.1f} s" + ("" if code == 0 else f": {last}"), flush=True)
    print(f"{started} of {args.runs} fresh campaigns started and finished")


if __name__ == "__main__":
    sys.exit(main())
