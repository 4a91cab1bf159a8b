"""Masks recorded from the code before the search was rebuilt (issue 25), so that any later change
to the allocators' search or to the sequential loop is checked against them bit for bit.

Each cell prunes a tiny random model built from a config (or SmolLM2 at a small size) with the
library's own pipeline; its record is the sha256 over every prunable matrix's name and packed
``weight == 0`` bits, plus what the allocator chose (readable when a digest differs).

Record again only when a change is *meant* to change masks, and say so in the commit:

    .venv/bin/python tests/recorded_masks.py --record
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np

RECORDED = Path(__file__).parent / "data" / "recorded-masks.json"
SMALL = dict(nsamples=4, search_nsamples=2, seqlen=32, batch_size=2, seed=0)

# ATP's grid step of 0.002 gives hundreds of candidates on two or three blocks; 0.05 gives 10-16.
FAST = {"atp": {"atp_step": 0.05}}

# (cell name, model key, PruneConfig fields): every allocator on a GQA Llama, the searches on the
# families that differ (sliding windows of 8 tokens in windows of 32, experts), and SmolLM2.
CELLS = [
    *[(f"llama-wanda-{top_up}-{s}", "llama", dict(method="wanda", top_up=top_up, sparsity=s, **FAST.get(top_up, {})))
      for top_up in ("uniform", "owl", "alpha", "dsnot", "dlp", "atp", "neuroal") for s in (0.5, 0.7)],
    ("llama-wanda-neuroal-grid", "llama", dict(method="wanda", top_up="neuroal", sparsity=0.6, neuroal_strategy="grid")),
    ("llama-wanda-neuroal-dense", "llama", dict(method="wanda", top_up="neuroal", sparsity=0.6, neuroal_mode="dense")),
    ("llama-wanda-neuroal-block", "llama", dict(method="wanda", top_up="neuroal", sparsity=0.6, neuroal_step="block")),
    ("llama-sparsegpt-neuroal", "llama", dict(method="sparsegpt", top_up="neuroal", sparsity=0.6)),
    ("llama-sparsegpt-atp", "llama", dict(method="sparsegpt", top_up="atp", sparsity=0.6, atp_step=0.1)),
    ("llama-multiflow-neuroal", "llama", dict(method="multiflow", top_up="neuroal", sparsity=0.6)),
    ("llama-ria-neuroal", "llama", dict(method="ria", top_up="neuroal", sparsity=0.6)),
    ("llama-magnitude-neuroal", "llama", dict(method="magnitude", top_up="neuroal", sparsity=0.6)),
    ("llama-magnitude-atp", "llama", dict(method="magnitude", top_up="atp", sparsity=0.6, **FAST["atp"])),
    *[(f"{family}-wanda-{top_up}", family, dict(method="wanda", top_up=top_up, sparsity=0.6, **FAST.get(top_up, {})))
      for family in ("gemma3", "qwen2", "mixtral", "qwen2moe") for top_up in ("neuroal", "atp")],
    ("mixtral-wanda-neuroal-dense", "mixtral", dict(method="wanda", top_up="neuroal", sparsity=0.6, neuroal_mode="dense")),
    ("smollm2-wanda-neuroal", "smollm2", dict(method="wanda", top_up="neuroal", sparsity=0.6)),
    ("smollm2-wanda-atp", "smollm2", dict(method="wanda", top_up="atp", sparsity=0.6, atp_step=0.01)),
]


def model_configs() -> dict:
    """The tiny models by key: a 3-block GQA Llama, and families whose blocks differ."""
    from conftest import SMOLLM2_VOCAB, tiny_family_configs, tiny_llama_config, tiny_moe_configs

    families, moe = tiny_family_configs(SMOLLM2_VOCAB), tiny_moe_configs(SMOLLM2_VOCAB)
    return {"llama": tiny_llama_config(), "gemma3": families["Gemma3ForCausalLM"],
            "qwen2": families["Qwen2ForCausalLM"], "mixtral": moe["MixtralForCausalLM"],
            "qwen2moe": moe["Qwen2MoeForCausalLM"]}


def model_folders(root: Path, tokenizer) -> dict[str, str]:
    """Every model key saved as a folder under ``root`` (seed 0) with ``tokenizer`` (SmolLM2's),
    and SmolLM2 by its alias."""
    from conftest import save_tiny_model

    folders = {key: str(save_tiny_model(config, tokenizer, root / key)) for key, config in model_configs().items()}
    return {**folders, "smollm2": "smollm2-135m"}


def record_of(model: str, fields: dict, cache: Path) -> dict:
    """Prune one cell in memory; its masks' digest and what its allocator chose."""
    from neuroal.config import PruneConfig
    from neuroal.models import prunable_matrices
    from neuroal.pipeline import Plan, prune_in_memory

    config = PruneConfig(model=model, **SMALL, **fields)
    pruned, _, manifest = prune_in_memory(Plan.of(config), activation_cache=cache)
    digest = hashlib.sha256()
    for name, matrix in prunable_matrices(pruned).items():
        digest.update(name.encode())
        digest.update(np.packbits((matrix.weight == 0).numpy()).tobytes())
    return {"masks": digest.hexdigest(), "achieved": manifest.achieved_sparsity, "chosen": chosen(manifest.allocation)}


def chosen(details: dict) -> dict:
    """The allocator's decision in a few numbers (NeuroAl's lambdas, ATP's beta)."""
    search = details.get("neuroal") or {}
    picks = {"block_lambda": search.get("block_lambda"), "row_lambda": search.get("row_lambda"),
             "beta": details.get("beta")}
    return {k: v for k, v in picks.items() if v is not None}


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record", action="store_true", help=f"write {RECORDED.name}")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from neuroal.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m").folder)
    with tempfile.TemporaryDirectory() as tmp:
        folders = model_folders(Path(tmp), tokenizer)
        records = {name: record_of(folders[key], fields, Path(tmp) / "cache") for name, key, fields in CELLS}
    text = json.dumps(records, indent=1, sort_keys=True) + "\n"
    if args.record:
        RECORDED.parent.mkdir(exist_ok=True)
        RECORDED.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
