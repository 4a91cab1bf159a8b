"""NeuroAl's math (docs/algorithm.md, "NeuroAl"): the candidate lambdas, the block schedule, the
row distribution, the alignment distance, and the mapping of a consumer's delta onto the rows of
the modules that feed it. Pure functions of tensors and numbers."""

from __future__ import annotations

import torch

from neuroal.models import Architecture, Matrix

BLOCK_LAMBDAS = (0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.10, 0.12, 0.15, 0.20, 0.25)
ROW_LAMBDAS = (0.0, *BLOCK_LAMBDAS)
CLIP = (0.01, 0.99)  # no module or row is left fully dense or fully pruned


def block_lambdas(sparsity: float, grid: tuple[float, ...] = BLOCK_LAMBDAS) -> list[float]:
    """Block-step candidates: the grid, without 0.25 at 80% sparsity and above (it would clip)."""
    return [lam for lam in grid if not (sparsity >= 0.8 and lam == 0.25)]


def row_lambdas(grid: tuple[float, ...] = BLOCK_LAMBDAS) -> list[float]:
    """Row-step candidates: 0 (every row at its module's sparsity) and the block grid."""
    return sorted({0.0, *grid})


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
    activation-norm profiles are, whatever their scale. A profile of no activation (an expert no
    token reached) is all zeros."""
    gap = _profile(a_dense) - _profile(a_sparse)
    return float(torch.linalg.vector_norm(gap) / a_dense.numel())


def _profile(norms: torch.Tensor) -> torch.Tensor:
    total = norms.double().sum()
    return norms.double() / total if total > 0 else torch.zeros_like(norms, dtype=torch.float64)


def pooled_norms(norms: list[torch.Tensor]) -> torch.Tensor:
    """The input norms of a fused expert tensor over all its experts, ``sqrt(sum_e a_e^2)``: every
    routed token counted once per expert that reads it (the MLP input's norms times sqrt(top-k))."""
    return torch.sqrt(sum(a.double() ** 2 for a in norms))


def producer_vectors(arch: Architecture, deltas: list[dict[str, torch.Tensor]], index: int,
                     matrices: dict[str, Matrix], config) -> dict[str, torch.Tensor]:
    """Each producer matrix's per-row vector in block ``index``: the delta of the matrix that
    reads its output rows, fitted to the producer's rows.

    Args:
        arch: The model's roles.
        deltas: Per block, each matrix's ``a_dense - a_sparse`` (one entry per input column), and
            per fused expert tensor (by its stem) that of all its experts pooled (``pooled_norms``).
        index: The block.
        matrices: The block's matrices, by block-relative name.
        config: The model config (head counts for grouped-query attention).

    Returns:
        ``{producer name: per-row vector}``. Attention inputs take the attention output's delta;
        the attention output takes the MLP input's (the first of ``arch.mlp_in`` present: the
        pooled expert inputs of a mixture of experts); an MLP input takes the delta of the MLP
        output of its own unit (expert e's gate/up: expert e's down); an MLP output takes the next
        block's attention-input delta. The last block's MLP outputs, and matrices without a role,
        have none.
    """
    block = deltas[index]
    following = deltas[index + 1] if index + 1 < len(deltas) else {}
    vectors = {}
    for name, matrix in matrices.items():
        role = next((r for r, stems in arch.roles().items() if matrix.stem in stems), None)
        if role == "attn_in":
            consumer = _first_present(arch.attn_out, block)
        elif role == "attn_out":
            consumer = _first_present(arch.mlp_in, block)
        elif role == "mlp_in":
            consumer = block.get(_unit_output(matrix, arch.mlp_out))
        elif role == "mlp_out":
            consumer = _first_present(arch.attn_in, following)
        else:
            consumer = None
        if consumer is not None:
            interleaved = matrix.expert is not None and not getattr(matrix.owner, "is_concatenated", True)
            vectors[name] = fit_rows(consumer, matrix.weight.shape[0], config, arch.qkv_layout, role, interleaved)
    return vectors


def _first_present(names: tuple[str, ...], deltas: dict[str, torch.Tensor]) -> torch.Tensor | None:
    return next((deltas[n] for n in names if n in deltas), None)


def _unit_output(matrix: Matrix, outputs: tuple[str, ...]) -> str | None:
    """The MLP output matrix of ``matrix``'s unit: the output stem under the same parent module,
    and for an expert slice the same expert."""
    parent = matrix.stem.rpartition(".")[0]
    stem = next((o for o in outputs if o.rpartition(".")[0] == parent), None)
    if stem is None:
        return None
    return stem if matrix.expert is None else f"{stem}.{matrix.expert}"


def fit_rows(vector: torch.Tensor, rows: int, config, qkv_layout: str = "concat", role: str = "attn_in",
             interleaved: bool = False) -> torch.Tensor:
    """Shape a consumer's delta to a producer's rows.

    As is when the counts match. Attention inputs: folded over the query heads that share a k/v
    head (grouped-query attention), or ``[q; k; v]`` for a fused projection (``per_head``:
    ``[q_h; k_h; v_h]`` per head, GPT-NeoX). MLP inputs: ``[gate; up]`` for a fused projection
    (``interleaved``: ``[gate_0, up_0, gate_1, ...]``, as GPT-OSS's experts keep it). The
    role settles what the counts alone cannot (a fused qkv under GQA can have twice the delta's
    rows, as a fused gate_up does).
    """
    if rows == vector.numel():
        return vector
    if role == "mlp_in" and rows == 2 * vector.numel():  # fused gate and up
        return vector.repeat_interleave(2) if interleaved else torch.cat([vector, vector])
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
