"""NeuroAl's math (docs/algorithm.md, "NeuroAl"): the candidate lambdas, the block schedule, the
row distribution, the alignment distance, and the mapping of a consumer's delta onto the rows of
the modules that feed it. Pure functions of tensors and numbers."""

from __future__ import annotations

import torch

from neuroal.models import Architecture

BLOCK_LAMBDAS = (0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.10, 0.12, 0.15, 0.20, 0.25)
ROW_LAMBDAS = (0.0, *BLOCK_LAMBDAS)
CLIP = (0.01, 0.99)  # no module or row is left fully dense or fully pruned


def block_lambdas(sparsity: float) -> list[float]:
    """Block-step candidates: the grid, without 0.25 at 80% sparsity and above (it would clip)."""
    return [lam for lam in BLOCK_LAMBDAS if not (sparsity >= 0.8 and lam == 0.25)]


def block_schedule(num_blocks: int, sparsity: float, lam: float) -> list[float]:
    """Per-block sparsity: ``s - lambda`` for the first block to ``s + lambda`` for the last, linear."""
    raw = torch.arange(1, num_blocks + 1, dtype=torch.float64)
    density = _spread(raw, 1 - sparsity, lam).sort(descending=True).values
    return [min(max(1 - d, CLIP[0]), CLIP[1]) for d in density.tolist()]


def row_sparsities(vector: torch.Tensor, module_sparsity: float, lam: float) -> torch.Tensor:
    """Per-row sparsity of a producer from its consumer's delta: a larger delta, a denser row."""
    density = _spread(vector.double(), 1 - module_sparsity, lam)
    return (1 - density).clamp(*CLIP)


def _spread(values: torch.Tensor, mean_density: float, lam: float) -> torch.Tensor:
    """Min-max normalise to ``[0, 2 lambda]`` and shift to ``mean_density``; constant -> flat."""
    span = values.max() - values.min()
    if span == 0:
        return torch.full_like(values, mean_density)
    scaled = (values - values.min()) / span * (2 * lam)
    return scaled - scaled.mean() + mean_density


def alignment_distance(a_dense: torch.Tensor, a_sparse: torch.Tensor) -> float:
    """``|| a_dense/sum(a_dense) - a_sparse/sum(a_sparse) ||_2 / numel``: how far apart the two
    activation-norm profiles are, whatever their scale."""
    gap = a_dense.double() / a_dense.double().sum() - a_sparse.double() / a_sparse.double().sum()
    return float(torch.linalg.vector_norm(gap) / a_dense.numel())


def producer_vectors(arch: Architecture, deltas: list[dict[str, torch.Tensor]], index: int,
                     rows: dict[str, int], config) -> dict[str, torch.Tensor]:
    """Each producer module's per-row vector in block ``index``: the delta of the module that reads
    its output rows, fitted to the producer's rows.

    Args:
        arch: The model's roles.
        deltas: Per block, each module's ``a_dense - a_sparse`` (one entry per input column).
        index: The block.
        rows: Output rows of each module of the block, by block-relative name.
        config: The model config (head counts for grouped-query attention).

    Returns:
        ``{producer name: per-row vector}``. The MLP output takes the next block's attention-input
        delta; the last block's MLP output, and modules without a role, have none.
    """
    block = deltas[index]
    consumer_of: dict[str, tuple[str, torch.Tensor]] = {}
    for role, producers, consumer in (("attn_in", arch.attn_in, arch.attn_out), ("attn_out", arch.attn_out, arch.mlp_in),
                                      ("mlp_in", arch.mlp_in, arch.mlp_out)):
        if consumer and consumer[0] in block:
            consumer_of.update({name: (role, block[consumer[0]]) for name in producers})
    if index + 1 < len(deltas) and arch.attn_in:
        consumer_of.update({name: ("mlp_out", deltas[index + 1][arch.attn_in[0]]) for name in arch.mlp_out})
    return {name: fit_rows(vector, rows[name], config, arch.qkv_layout, role)
            for name, (role, vector) in consumer_of.items()}


def fit_rows(vector: torch.Tensor, rows: int, config, qkv_layout: str = "concat", role: str = "attn_in") -> torch.Tensor:
    """Shape a consumer's delta to a producer's rows.

    As is when the counts match. Attention inputs: folded over the query heads that share a k/v
    head (grouped-query attention), or ``[q; k; v]`` for a fused projection (``per_head``:
    ``[q_h; k_h; v_h]`` per head, GPT-NeoX). MLP inputs: ``[gate; up]`` for a fused projection. The
    role settles what the counts alone cannot (a fused qkv under GQA can have twice the delta's
    rows, as a fused gate_up does).
    """
    if rows == vector.numel():
        return vector
    if role == "mlp_in" and rows == 2 * vector.numel():  # fused gate and up
        return torch.cat([vector, vector])
    if role == "attn_in":
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = vector.numel() // heads
        folded = vector.reshape(kv_heads, heads // kv_heads, head_dim).mean(dim=1).flatten()
        if rows == folded.numel():
            return folded
        if rows == vector.numel() + 2 * folded.numel():  # fused q, k, v
            if qkv_layout == "per_head":
                return vector.reshape(heads, 1, head_dim).expand(heads, 3, head_dim).flatten()
            return torch.cat([vector, folded, folded])
    raise ValueError(f"cannot map a delta of {vector.numel()} entries onto the {rows} rows of a {role} module")
