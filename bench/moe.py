"""Prune time and peak memory of a mixture-of-experts model against a dense model with the same
number of decoder-block weights.

    .venv/bin/python bench/moe.py --hidden 512 --experts 8 --expert-size 512 --layers 4

The MoE model is a random Mixtral (``--experts`` experts of ``--expert-size`` intermediate
units, 2 per token); the dense one a random Llama whose MLP has ``experts x expert-size`` units,
so both blocks hold the same weights (the router's ``experts x hidden`` aside). Both use the SmolLM2
tokenizer. Each prune runs alone in a child process (peak RSS from ``os.wait4``, see
``memory.py``): wanda + uniform, wanda + NeuroAl and SparseGPT + uniform, 32 x 256 calibration tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parent))  # memory.py, after the package (bench/neuroal.py)

from memory import GiB, measure  # noqa: E402

PRUNES = {
    "wanda + uniform": ["--method", "wanda", "--top-up", "uniform"],
    "wanda + neuroal": ["--method", "wanda", "--top-up", "neuroal"],
    "sparsegpt + uniform": ["--method", "sparsegpt", "--top-up", "uniform"],
}


def build(folder: Path, moe: bool, args) -> int:
    """Save a random model; returns its decoder-block weight count (routers aside)."""
    import torch
    import transformers as tf

    from neuroal.models import load_tokenizer, prunable_matrices, resolve_model

    common = dict(vocab_size=49152, hidden_size=args.hidden, num_hidden_layers=args.layers,
                  num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 128,
                  max_position_embeddings=2048, tie_word_embeddings=True)
    if moe:
        config = tf.MixtralConfig(**common, intermediate_size=args.expert_size, num_local_experts=args.experts,
                                  num_experts_per_tok=2)
    else:
        config = tf.LlamaConfig(**common, intermediate_size=args.experts * args.expert_size)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    load_tokenizer(resolve_model("smollm2-135m")).save_pretrained(folder)
    return sum(m.weight.numel() for m in prunable_matrices(model).values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--expert-size", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--sparsity", default="0.5")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="neuroal-moe-"))
    cli = str(Path(sys.executable).with_name("neuroal"))
    rows = []
    try:
        for kind in ("dense", "moe"):
            folder = work / kind
            weights = build(folder, kind == "moe", args)
            for what, flags in PRUNES.items():
                out = work / f"{kind}-{what.replace(' + ', '-')}"
                wall, peak = measure([cli, "-q", "prune", "--model", str(folder), *flags, "--sparsity", args.sparsity,
                                      "--nsamples", "32", "--seqlen", "256", "--out", str(out)], dict(os.environ))
                manifest = json.loads((out / "neuroal.json").read_text())
                rows.append((kind, what, weights, wall, manifest["timings"]["prune"], manifest["timings"]["allocate"],
                             peak, manifest["achieved_sparsity"]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"hidden {args.hidden}, {args.layers} blocks; MoE: {args.experts} experts x {args.expert_size}, 2 per token; "
          f"dense: MLP of {args.experts * args.expert_size}; {os.cpu_count()} CPUs")
    print("| model | prune | block weights | wall s | prune s | allocate s | peak RSS GiB | achieved |")
    print("|---|---|---|---|---|---|---|---|")
    for kind, what, weights, wall, prune, allocate, peak, achieved in rows:
        print(f"| {kind} | {what} | {weights / 1e6:.1f} M | {wall:.1f} | {prune:.1f} | {allocate:.1f} | "
              f"{peak / GiB:.2f} | {achieved:.4f} |")


if __name__ == "__main__":
    main()
