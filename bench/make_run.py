"""How long a new user's first `make run` takes: a fresh clone of this repository (its committed
HEAD), `make setup` in it, then `make run`, with an empty neuroal cache (the embedded model is
converted again) and a fresh Prefect home; prints both times and where the campaign's went.

    .venv/bin/python bench/make_run.py [--params params.yaml] [--keep DIR]

Run it alone: every number here is CPU-bound. pip's download cache is left as it is (warm on a
machine that installed the stack once).
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


def timed(command: list[str], cwd: Path, env: dict) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml", help="PARAMS of make run")
    parser.add_argument("--keep", type=Path, help="clone here and keep it (default: a temporary folder)")
    args = parser.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="neuroal-make-run-"))
    clone = folder / "neuroal"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "VIRTUAL_ENV"))}
    env.update(PREFECT_HOME=str(folder / "prefect-home"), NEUROAL_CACHE=str(folder / "neuroal-cache"))
    setup = timed(["make", "setup"], clone, env)
    print(f"make setup: {setup:.0f} s", flush=True)
    run = timed(["make", "run", f"PARAMS={args.params}"], clone, env)
    print(f"make run ({args.params}): {run:.0f} s = {run / 60:.1f} min; with setup {(setup + run) / 60:.1f} min")
    results = clone / "runs" / "campaign" / "results.json"
    if args.params == "params.yaml" and results.is_file():
        subprocess.run([sys.executable, str(REPO / "bench" / "campaign.py"), str(results)], check=True)


if __name__ == "__main__":
    main()
