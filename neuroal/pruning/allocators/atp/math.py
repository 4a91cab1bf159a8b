"""ATP (Huang et al., ICML 2025, "Determining Layer-wise Sparsity for Large Language Models
Through a Theoretical Perspective"): the pure math.

Block sparsities rise with depth in an arithmetic progression whose plain mean is the target
(paper Eq. 10; ``main.py`` of the authors' ``wzhuang-xmu/ATP``)::

    s_i = S - beta * (L - 1) / 2 + beta * (i - 1),   i = 1..L

so the first block gets ``S - beta (L-1)/2`` and the last ``S + beta (L-1)/2``. Blocks are
weighted equally (not by parameters) and nothing is clipped: ``beta`` is *legal* only while every
``s_i`` stays in ``[0, 1]``, i.e. ``beta <= min(2S, 2(1-S)) / (L - 1)`` (``main.py`` prints
"Illegal beta" and exits above it). The common difference is chosen by a grid search
(paper Sec. 3.4; ``search.sh``): ``beta = 0.002, 0.004, ...`` up to the last legal value, each
candidate pruned with the base method and scored by perplexity; the lowest wins, ties to the
smaller ``beta`` (``search.sh`` replaces the best only on a strictly lower perplexity). The grid
has no ``beta = 0`` (uniform) candidate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

# The paper's grid step for beta (Sec. 3.4, ablated in Table 5; ``search.sh`` adds 0.002 per run).
DEFAULT_STEP = 0.002
# Candidates are multiples of the step rounded to this many decimals: ``search.sh`` counts in
# exact decimal (``bc``), so 0.002 * 3 is 0.006 and not 0.006000000000000001.
_GRID_DECIMALS = 12


def max_beta(num_blocks: int, sparsity: float) -> float:
    """The largest legal common difference: ``min(2S, 2(1 - S)) / (L - 1)``.

    Args:
        num_blocks: ``L``, the decoder blocks.
        sparsity: ``S``, the target (mean) sparsity in ``[0, 1]``.

    Returns:
        The bound (``inf`` for a single block, where every ``beta`` gives the target).

    Raises:
        ValueError: on no blocks or a target outside ``[0, 1]``.
    """
    _check(num_blocks, sparsity)
    if num_blocks == 1:
        return math.inf
    return min(2 * sparsity / (num_blocks - 1), 2 * (1 - sparsity) / (num_blocks - 1))


def atp_sparsities(num_blocks: int, sparsity: float, beta: float) -> list[float]:
    """Block sparsities of paper Eq. 10, shallowest block first.

    Args:
        num_blocks: ``L``.
        sparsity: ``S``, their plain mean.
        beta: the common difference, ``0 <= beta <= max_beta(L, S)``.

    Returns:
        ``[s_1, ..., s_L]`` with ``s_1 = S - beta (L - 1) / 2`` and ``s_{i+1} - s_i = beta``. At the
        bound an end value can land a rounding error outside ``[0, 1]``; it is snapped back.

    Raises:
        ValueError: on a negative or illegal ``beta`` (the authors' "Illegal beta").
    """
    bound = max_beta(num_blocks, sparsity)
    if beta < 0 or beta > bound:
        raise ValueError(f"illegal ATP beta {beta}: it must lie in [0, {bound:.6g}] for {num_blocks} blocks "
                         f"at sparsity {sparsity}")
    first = sparsity - beta * (num_blocks - 1) / 2
    return [min(max(first + i * beta, 0.0), 1.0) for i in range(num_blocks)]


def beta_grid(num_blocks: int, sparsity: float, step: float = DEFAULT_STEP) -> list[float]:
    """The candidates of the authors' search: ``step, 2 step, ...`` while legal.

    Args:
        num_blocks: ``L``.
        sparsity: ``S``.
        step: the grid step (``DEFAULT_STEP``, the paper's).

    Returns:
        The legal multiples of ``step`` in increasing order; empty for a single block (nothing to
        choose) or when no multiple is legal (e.g. ``S = 0``).

    Raises:
        ValueError: on a non-positive step, no blocks or a target outside ``[0, 1]``.
    """
    if step <= 0:
        raise ValueError(f"the beta grid step must be > 0, got {step}")
    bound = max_beta(num_blocks, sparsity)
    if num_blocks == 1:
        return []
    grid, k = [], 1
    while (beta := round(k * step, _GRID_DECIMALS)) <= bound:
        grid.append(beta)
        k += 1
    return grid


def best_beta(perplexities: Mapping[float, float]) -> float:
    """The candidate with the lowest score; ties go to the smaller ``beta``; NaN never wins.

    Args:
        perplexities: a score per candidate ``beta`` (perplexity, or any increasing function of it).

    Returns:
        The chosen ``beta``.

    Raises:
        ValueError: if there is no candidate.
    """
    if not perplexities:
        raise ValueError("best_beta needs at least one scored candidate")
    return min(sorted(perplexities), key=lambda b: _finite_or_inf(perplexities[b]))


def _finite_or_inf(x: float) -> float:
    return x if not math.isnan(x) else math.inf


def _check(num_blocks: int, sparsity: float) -> None:
    if num_blocks < 1:
        raise ValueError(f"ATP needs at least one block, got {num_blocks}")
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")

