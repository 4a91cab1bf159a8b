"""NeuroAl against uniform on one model: search and final-prune times, their ratio to the uniform
prune, the chosen lambdas, and perplexities, for each mode and strategy, read side by side.

    .venv/bin/python bench/neuroal.py --model smollm2-135m --method wanda --sparsities 0.5,0.6,0.7 \
        --modes reference,dense --strategies grid,coarse --nsamples 32 --search-nsamples 8 --seqlen 256

Times are whole-process prune times in this process (load + calibration + allocate + prune), each
cell with an empty dense-activation cache; compare runs made under the same thread setting
(`torch.get_num_threads()` is printed).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from neuroal.config import PruneConfig  # noqa: E402
from neuroal.evaluation import eval_windows, perplexity  # noqa: E402
from neuroal.pipeline import Plan, prune_in_memory  # noqa: E402


def run_cell(config: PruneConfig, windows: dict[str, torch.Tensor]) -> dict:
    with tempfile.TemporaryDirectory() as cold:  # each cell pays its own dense pass, as a lone run would
        start = time.perf_counter()
        model, _, manifest = prune_in_memory(Plan.of(config), activation_cache=Path(cold))
        seconds = time.perf_counter() - start
    device = torch.device(manifest.device)
    ppl = {corpus: perplexity(model.to(device), w, device) for corpus, w in windows.items()}
    return {"seconds": seconds, "timings": manifest.timings, "summary": manifest.summary, "ppl": ppl,
            "achieved": manifest.achieved_sparsity}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="wanda")
    parser.add_argument("--sparsities", default="0.7")
    parser.add_argument("--modes", default="reference,dense")
    parser.add_argument("--strategies", default="grid,coarse")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--search-nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--corpora", default="wikipedia,treebank,lee")
    parser.add_argument("--eval-limit", type=int, default=100, help="test windows per corpus (all: 0)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    base = dict(model=args.model, method=args.method, nsamples=args.nsamples, search_nsamples=args.search_nsamples,
                seqlen=args.seqlen, device=args.device)
    from neuroal.models import load_model, resolve_model

    _, tokenizer = load_model(resolve_model(args.model))
    windows = {c: eval_windows(tokenizer, c, args.seqlen, args.eval_limit or None) for c in args.corpora.split(",")}
    print(f"{args.model} {args.method}; calibration {args.nsamples} x {args.seqlen}, search {args.search_nsamples}; "
          f"threads {torch.get_num_threads()}; eval windows " + ", ".join(f"{c} {w.shape[0]}" for c, w in windows.items()))
    rows = []
    for sparsity in map(float, args.sparsities.split(",")):
        uniform = run_cell(PruneConfig(**base, top_up="uniform", sparsity=sparsity), windows)
        rows.append({"sparsity": sparsity, "top_up": "uniform", **uniform})
        print(_line(rows[-1], uniform["seconds"]), flush=True)
        for mode in args.modes.split(","):
            for strategy in args.strategies.split(","):
                config = PruneConfig(**base, top_up="neuroal", sparsity=sparsity, neuroal_mode=mode,
                                     neuroal_strategy=strategy)
                rows.append({"sparsity": sparsity, "top_up": f"neuroal {mode}/{strategy}", **run_cell(config, windows)})
                print(_line(rows[-1], uniform["seconds"]), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=1))


def _line(row: dict, uniform_seconds: float) -> str:
    lam = row["summary"]
    t = row["timings"]
    ppl = " ".join(f"{c} {v:8.2f}" for c, v in row["ppl"].items())
    return (f"| {row['sparsity']:.0%} | {row['top_up']:26s} | block {lam.get('block_lambda', '-')!s:5} row {lam.get('row_lambda', '-')!s:5}"
            f" | search {t['allocate']:7.1f} s | prune {t['prune']:6.1f} s | total {row['seconds']:7.1f} s"
            f" | x{row['seconds'] / uniform_seconds:4.2f} | {ppl} |")


if __name__ == "__main__":
    main()
