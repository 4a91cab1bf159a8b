"""What DVC tracks per cell, and what it takes to get the checkpoint back: for each model, method
and sparsity, the lineage form's bytes against the dense model's weight files (in the source's
precision, and as bfloat16), and the time to materialize the full folder against the time to
load the dense model. Prints a markdown table; --json keeps every cell as it finishes, and a rerun
with the same settings resumes from it.

    .venv/bin/python bench/lineage.py --models smollm2-135m,gemma3-270m,qwen2.5-coder-0.5b,qwen2.5-coder-1.5b \
        --json bench/results/lineage.json

Each cell prunes with uniform sparsity on a small calibration set (the bytes do not depend on its
size), writes the checkpoint and its lineage form to a scratch folder, and materializes it again
(every file checked against its sha256; median of three). Dense load: ``AutoModelForCausalLM.from_pretrained`` of
the source's weights, median of three, in the same process; it memory-maps the weight files
and reads nothing, so ``load + read`` also sums every weight once, what any use of the model costs. ``masks zlib``: what zlib (level 6)
would make of the packed masks, the gain an entropy coder could bring.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.resumable import earlier_rows, save_rows  # noqa: E402
from neuroal.config import PruneConfig  # noqa: E402
from neuroal.digests import weight_files  # noqa: E402
from neuroal.files import safetensors_header  # noqa: E402
from neuroal.lineage import MASKS, materialize, write_lineage  # noqa: E402
from neuroal.models import load_model, resolve_model  # noqa: E402
from neuroal.pipeline import Plan, prune_to_checkpoint  # noqa: E402

SETTINGS = ("nsamples", "seqlen", "calib")  # what a row depends on besides its cell


def main() -> None:
    args = _arguments()
    logging.basicConfig(level=logging.WARNING)
    rows = earlier_rows(args.json, _settings(args))
    for model in args.models:
        for method in args.methods:
            for sparsity in args.sparsities:
                if not any(_is(r, model, method, sparsity) for r in rows):
                    rows.append(_cell(args, model, method, sparsity, _dense(model, rows)))
                    save_rows(args.json, _settings(args), rows)
    _print_table([r for m in args.models for me in args.methods for s in args.sparsities
                  for r in rows if _is(r, m, me, s)])


def _dense(model: str, rows: list[dict]) -> dict:
    """The dense model's weight bytes (as stored, and as bfloat16) and its load time."""
    known = next((r["dense"] for r in rows if r["model"] == model), None)
    if known:
        return known
    source = resolve_model(model)
    numel = sum(math.prod(info["shape"]) for path in weight_files(source.folder)
                for name, info in json.loads(safetensors_header(path)).items() if name != "__metadata__")
    loads, reads = [], []
    for _ in range(3):
        start = time.perf_counter()
        model, _ = load_model(source)
        loads.append(time.perf_counter() - start)
        sum(float(p.detach().sum()) for p in model.parameters())  # the memory-mapped weights, read once
        reads.append(time.perf_counter() - start)
        del model
    return {"bytes": sum(p.stat().st_size for p in weight_files(source.folder)), "bf16_bytes": 2 * numel,
            "load_s": statistics.median(loads), "load_read_s": statistics.median(reads)}


def _cell(args, model: str, method: str, sparsity: float, dense: dict) -> dict:
    config = PruneConfig(model=model, method=method, sparsity=sparsity, nsamples=args.nsamples, seqlen=args.seqlen,
                         calib=args.calib)
    plan = Plan.of(config)
    with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
        checkpoint, lineage, again = (Path(scratch) / name for name in ("checkpoint", "lineage", "again"))
        start = time.perf_counter()
        manifest = prune_to_checkpoint(plan, checkpoint)
        prune_s = time.perf_counter() - start
        start = time.perf_counter()
        form = write_lineage(checkpoint, plan.source, lineage).form
        lineage_s = time.perf_counter() - start
        materialize_s = _materialize_seconds(lineage, again, plan.source)
        tracked = sum(p.stat().st_size for p in lineage.iterdir())
        masks = (lineage / MASKS).read_bytes()
        row = dict(model=model, method=method, sparsity=sparsity, form=form, save_dtype=manifest.save_dtype,
                   achieved=manifest.achieved_sparsity, tracked_bytes=tracked,
                   checkpoint_bytes=sum(p.stat().st_size for p in checkpoint.iterdir()),
                   masks_bytes=len(masks), masks_zlib_bytes=len(zlib.compress(masks, 6)),
                   prune_s=prune_s, lineage_s=lineage_s, materialize_s=materialize_s, dense=dense)
    print(f"  {model} {method} {sparsity}: {form}, {tracked / dense['bytes']:.4f} of the dense bytes, "
          f"materialize {materialize_s:.1f} s (dense load {dense['load_s']:.1f} s)", flush=True)
    return row


def _materialize_seconds(lineage: Path, out: Path, source) -> float:
    """Median of three materializations, each after the dirty pages of the prune are written out
    (``os.sync``), so that the time is the rebuild's own."""
    seconds = []
    for _ in range(3):
        shutil.rmtree(out, ignore_errors=True)
        os.sync()
        start = time.perf_counter()
        materialize(lineage, out, source)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def _settings(args) -> dict:
    return {k: str(getattr(args, k)) for k in SETTINGS}


def _is(row: dict, model: str, method: str, sparsity: float) -> bool:
    return (row["model"], row["method"], row["sparsity"]) == (model, method, sparsity)


def _print_table(rows: list[dict]) -> None:
    print("\n| model | method | sparsity | form | saved as | tracked MB | / dense | / dense bf16 | masks zlib "
          "| materialize s | dense load s x2 | dense load + read s x2 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        d = r["dense"]
        print(f"| {r['model']} | {r['method']} | {r['sparsity']:.0%} | {r['form']} | {r['save_dtype']} "
              f"| {r['tracked_bytes'] / 1e6:.1f} | {r['tracked_bytes'] / d['bytes']:.3f} "
              f"| {r['tracked_bytes'] / d['bf16_bytes']:.3f} | {r['masks_zlib_bytes'] / max(r['masks_bytes'], 1):.3f} "
              f"| {r['materialize_s']:.2f} | {2 * d['load_s']:.2f} | {2 * d['load_read_s']:.2f} |")


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2-135m")
    parser.add_argument("--methods", default="wanda,sparsegpt")
    parser.add_argument("--sparsities", default="0.5,0.7")
    parser.add_argument("--nsamples", type=int, default=8, help="calibration windows (the bytes do not depend on them)")
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--calib", default="wikipedia")
    parser.add_argument("--scratch", type=Path, help="where the checkpoints are written (default: the temp folder)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.models, args.methods = args.models.split(","), args.methods.split(",")
    args.sparsities = [float(s) for s in args.sparsities.split(",")]
    return args


if __name__ == "__main__":
    main()
