"""Peak resident memory of a zoo model's GGUF conversion and of two prunes of it.

    .venv/bin/python bench/memory.py --model qwen2.5-coder-1.5b

Each measured step runs alone in a child process (its peak RSS comes from ``os.wait4``, the
kernel's ``ru_maxrss`` of that child), against a temporary neuroal cache:

  convert   resolve the alias from a cold cache: join the parts, dequantize the GGUF, save
  uniform   neuroal prune --method wanda --top-up uniform --sparsity 0.5 --nsamples 8 --seqlen 256
  neuroal   the same with --top-up neuroal --search-nsamples 4

The prunes read the folder that ``convert`` wrote. The goal for a prune is the model's float32
size (parameters x 4 bytes) plus 1.5 GiB for the interpreter, torch, the tokenizer, calibration
activations and the copy of one block being worked on.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GiB = 2**30
OVERHEAD = 1.5 * GiB  # interpreter + torch + tokenizer + activations + one block in flight
PRUNE = ["--method", "wanda", "--sparsity", "0.5", "--nsamples", "8", "--seqlen", "256"]


def measure(command: list[str], env: dict) -> tuple[float, float]:
    """Run ``command`` in a child process; returns (wall seconds, peak RSS in bytes)."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(command)} failed with exit code {proc.returncode}:\n{output[-4000:]}")
    return wall, usage.ru_maxrss * 1024  # Linux reports KiB


def float32_bytes(folder: Path) -> int:
    """Parameters x 4 bytes, from the safetensors headers (tied weights are stored once)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - a safe_open handle is not iterable
                total += 4 * math.prod(f.get_slice(key).get_shape())
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-1.5b", help="a model alias")
    parser.add_argument("--keep", action="store_true", help="keep the temporary cache and checkpoints")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="neuroal-memory-"))
    env = {**os.environ, "NEUROAL_CACHE": str(work / "cache")}
    python, cli = sys.executable, str(Path(sys.executable).with_name("neuroal"))
    resolve = f"from neuroal.models import resolve_model; print(resolve_model({args.model!r}).folder)"
    steps = {
        "convert (cold cache)": [python, "-c", resolve],
        "prune wanda + uniform": [cli, "-q", "prune", "--model", args.model, "--top-up", "uniform", *PRUNE,
                                  "--out", str(work / "uniform")],
        "prune wanda + neuroal": [cli, "-q", "prune", "--model", args.model, "--top-up", "neuroal",
                                  "--search-nsamples", "4", *PRUNE, "--out", str(work / "neuroal")],
    }
    try:
        rows = [(what, *measure(command, env)) for what, command in steps.items()]
        folder = Path(subprocess.run([python, "-c", resolve], env=env, capture_output=True, text=True,
                                     check=True).stdout.strip().splitlines()[-1])
        size = float32_bytes(folder)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    goal = size + OVERHEAD
    print(f"{args.model}: float32 size {size / GiB:.2f} GiB, goal for a prune {goal / GiB:.2f} GiB "
          f"(float32 size + {OVERHEAD / GiB:.1f} GiB); torch threads: default, {os.cpu_count()} CPUs")
    print(f"| {'what':<24} | {'wall s':>7} | {'peak RSS GiB':>12} | {'float32 GiB':>11} | {'goal GiB':>8} | within |")
    print(f"|{'-' * 26}|{'-' * 9}|{'-' * 14}|{'-' * 13}|{'-' * 10}|--------|")
    for what, wall, peak in rows:
        within = "yes" if peak <= goal else "no"
        if what.startswith("convert"):
            within = "n/a"  # the goal is for prunes; conversion runs once per model
        print(f"| {what:<24} | {wall:>7.1f} | {peak / GiB:>12.2f} | {size / GiB:>11.2f} | {goal / GiB:>8.2f} "
              f"| {within:>6} |")


if __name__ == "__main__":
    main()
