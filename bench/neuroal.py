"""The searching allocators against uniform on one model: whole-prune time and its ratio to the
uniform prune, allocation time and its ratio to the same cell's prune, what the search chose, and
perplexities, read side by side.

    .venv/bin/python bench/neuroal.py --model smollm2-135m --sparsities 0.5,0.7 \
        --variants uniform,neuroal,atp,atp-fast --json bench/results/neuroal-smollm2.json

A search's cost is fixed by the search set, so its share of the cell falls as ``--nsamples``
grows: the README's first table is read at ``neuroal prune``'s default, ``--nsamples 128``.

Variants: ``uniform``; ``neuroal`` (``--modes`` x ``--strategies``, default the reference mode's
coarse walk); ``neuroal-zero`` (the same with lambda 0 among the block candidates); ``atp`` (the
authors' grid on every calibration window); ``atp-fast`` (a golden-section walk over the same
grid, scored on the search set). Times are whole in-process prunes (load + calibration + allocate
+ prune) in this one process, each cell with an empty dense-statistics cache; compare runs made
under the same thread setting (printed). ``--json`` keeps every cell as it finishes; a rerun with
the same settings resumes from it.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.resumable import earlier_rows, save_rows  # noqa: E402
from neuroal.config import PruneConfig  # noqa: E402
from neuroal.evaluation import eval_windows, perplexity  # noqa: E402
from neuroal.models import load_model, resolve_model  # noqa: E402
from neuroal.pipeline import Plan, prune_in_memory  # noqa: E402
from neuroal.pruning.allocators.neuroal.math import BLOCK_LAMBDAS  # noqa: E402


def variants(args) -> dict[str, dict]:
    """Each named variant's config fields."""
    named = {"uniform": {"top_up": "uniform"},
             "atp": {"top_up": "atp"},
             "atp-fast": {"top_up": "atp", "atp_strategy": "coarse", "atp_search_set": True}}
    for mode in args.modes.split(","):
        for strategy in args.strategies.split(","):
            suffix = "" if (mode, strategy) == ("reference", "coarse") else f"-{mode}-{strategy}"
            neuroal = {"top_up": "neuroal", "neuroal_mode": mode, "neuroal_strategy": strategy}
            named[f"neuroal{suffix}"] = neuroal
            named[f"neuroal-zero{suffix}"] = {**neuroal, "neuroal_lambdas": (0.0, *BLOCK_LAMBDAS)}
    wanted = args.variants.split(",")
    unknown = [v for v in wanted if v not in named]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {', '.join(named)}")
    return {name: named[name] for name in wanted}


def run_cell(config: PruneConfig, windows: dict[str, torch.Tensor]) -> dict:
    with tempfile.TemporaryDirectory() as cold:  # each cell pays its own dense pass, as a lone run would
        start = time.perf_counter()
        model, _, manifest = prune_in_memory(Plan.of(config), activation_cache=Path(cold))
        seconds = time.perf_counter() - start
    device = torch.device(manifest.device)
    ppl = {corpus: perplexity(model.to(device), w, device) for corpus, w in windows.items()}
    return {"seconds": round(seconds, 2), "timings": manifest.timings, "summary": manifest.summary, "ppl": ppl,
            "achieved": manifest.achieved_sparsity}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="wanda")
    parser.add_argument("--sparsities", default="0.5,0.7")
    parser.add_argument("--variants", default="uniform,neuroal")
    parser.add_argument("--modes", default="reference", help="NeuroAl modes (reference, dense)")
    parser.add_argument("--strategies", default="coarse", help="NeuroAl strategies (grid, coarse)")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--search-nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--calib", default="wikipedia")
    parser.add_argument("--corpora", default="wikipedia,lee,python-stdlib")
    parser.add_argument("--eval-limit", type=int, default=20, help="test windows per corpus (all: 0)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    chosen = variants(args)
    base = dict(model=args.model, method=args.method, nsamples=args.nsamples, search_nsamples=args.search_nsamples,
                seqlen=args.seqlen, calib=args.calib, device=args.device)
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "variants", "sparsities")}
    rows = earlier_rows(args.json, settings)
    _, tokenizer = load_model(resolve_model(args.model))
    windows = {c: eval_windows(tokenizer, c, args.seqlen, args.eval_limit or None) for c in args.corpora.split(",")}
    print(f"{args.model} {args.method}; calibration {args.calib} {args.nsamples} x {args.seqlen}, search "
          f"{args.search_nsamples}; threads {torch.get_num_threads()}; eval windows "
          + ", ".join(f"{c} {w.shape[0]}" for c, w in windows.items()))
    for sparsity in map(float, args.sparsities.split(",")):
        for name, fields in chosen.items():
            done = [r for r in rows if (r["sparsity"], r["variant"]) == (sparsity, name)]
            if not done:
                rows.append({"sparsity": sparsity, "variant": name,
                             **run_cell(PruneConfig(**base, **fields, sparsity=sparsity), windows)})
                save_rows(args.json, settings, rows)
            print(_line((done or rows)[-1], _uniform(rows, sparsity)), flush=True)


def _uniform(rows: list[dict], sparsity: float) -> float | None:
    return next((r["seconds"] for r in rows if (r["sparsity"], r["variant"]) == (sparsity, "uniform")), None)


def _line(row: dict, uniform_seconds: float | None) -> str:
    t, chose = row["timings"], ", ".join(f"{k} {v}" for k, v in row["summary"].items() if k != "mode")
    ratio = f"x{row['seconds'] / uniform_seconds:4.2f}" if uniform_seconds else "  -  "
    ppl = " ".join(f"{c} {v:8.2f}" for c, v in row["ppl"].items())
    return (f"| {row['sparsity']:.0%} | {row['variant']:14s} | {chose or '-':28s} | allocate {t['allocate']:7.1f} s"
            f" | prune {t['prune']:6.1f} s | allocate/prune x{t['allocate'] / t['prune']:5.2f}"
            f" | total {row['seconds']:7.1f} s | {ratio} | {ppl} |")


if __name__ == "__main__":
    main()
