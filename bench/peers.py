"""Perplexity and prune time of every base method x peer top-up at given sparsities, beside the
dense model, on one model and calibration setting. Prints a markdown table (and writes JSON).

    .venv/bin/python bench/peers.py --model smollm2-135m --sparsities 0.5,0.7 \
        --methods magnitude,wanda,multiflow,sparsegpt --top-ups uniform,owl,alpha \
        --nsamples 32 --seqlen 256 --eval-corpus wikipedia --eval-limit 100 --json runs/bench-peers.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from neuroal.config import PruneConfig  # noqa: E402
from neuroal.evaluation import eval_windows, perplexity  # noqa: E402
from neuroal.models import load_model, resolve_device, resolve_dtype, resolve_model  # noqa: E402
from neuroal.pipeline import Plan, prune_in_memory  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", default="magnitude,wanda,multiflow,sparsegpt")
    parser.add_argument("--top-ups", default="uniform,owl,alpha")
    parser.add_argument("--sparsities", default="0.5,0.7")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--eval-corpus", default="wikipedia")
    parser.add_argument("--eval-seqlen", type=int, default=256)
    parser.add_argument("--eval-limit", type=int, default=100, help="test windows scored (all: 0)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    device = resolve_device(args.device)
    model, tokenizer = load_model(resolve_model(args.model), resolve_dtype("auto", device))
    windows = eval_windows(tokenizer, args.eval_corpus, args.eval_seqlen, args.eval_limit or None)
    dense = perplexity(model.to(device), windows, device)
    print(f"{args.model}: dense perplexity on {args.eval_corpus} test ({windows.shape[0]} x {args.eval_seqlen}): {dense:.2f}")

    rows = []
    for sparsity in map(float, args.sparsities.split(",")):
        for method in args.methods.split(","):
            for top_up in args.top_ups.split(","):
                config = PruneConfig(model=args.model, method=method, top_up=top_up, sparsity=sparsity,
                                     nsamples=args.nsamples, seqlen=args.seqlen, device=args.device)
                start = time.perf_counter()
                pruned, _, manifest = prune_in_memory(Plan.of(config))
                seconds = time.perf_counter() - start
                ppl = perplexity(pruned.to(device), windows, device)
                rows.append(dict(sparsity=sparsity, method=method, top_up=top_up, ppl=ppl, seconds=seconds,
                                 achieved=manifest["achieved_sparsity"], timings=manifest["timings"]))
                print(f"  s={sparsity} {method:9s} {top_up:8s} ppl {ppl:10.2f}  achieved {manifest['achieved_sparsity']:.4f}"
                      f"  {seconds:6.1f} s", flush=True)

    print("\n| sparsity | method | " + " | ".join(args.top_ups.split(",")) + " | prune s (uniform) |")
    print("|---|---|" + "---|" * (len(args.top_ups.split(",")) + 1))
    for sparsity in map(float, args.sparsities.split(",")):
        for method in args.methods.split(","):
            cells = [r for r in rows if r["sparsity"] == sparsity and r["method"] == method]
            print(f"| {sparsity:.0%} | {method} | " + " | ".join(f"{r['ppl']:.1f}" for r in cells)
                  + f" | {cells[0]['seconds']:.1f} |")
    print(f"| 0% | dense | {dense:.2f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"dense": dense, "rows": rows, "args": vars(args) | {"json": str(args.json)}},
                                        indent=1))


if __name__ == "__main__":
    main()
