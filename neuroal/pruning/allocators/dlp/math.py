"""DLP (Chen et al. 2025, "Dynamic Layerwise Pruning in Large Language Models"): the pure math.

Blocks whose Wanda scores have a larger median are judged less important and pruned more.
Transcribed from the authors' ``ironartisan/DLP`` ``lib/prune.py``, ``get_dlp_ratios`` (the
ratios that ``prune_wanda_dlp``, ``prune_sparsegpt_dlp`` and ``prune_mag_dlp`` prune with), with
the defaults of their ``main.py`` (``--alpha 0.15``, ``--strategy median``):

* per decoder block, the Wanda scores ``|W| * sqrt(scaler_row)`` of *all* its linear modules,
  computed on the dense model walked block by block, are flattened and concatenated; the block's
  unimportance is ``|strategy(scores)|`` with ``strategy`` the median by default
  (:func:`block_unimportance`);
* ``imp = 1 - u / sum(u)`` is each block's importance; ``imp`` is mapped min-max onto
  ``[0, 2 * alpha]``, shifted so that its mean is the target density ``1 - sparsity``, and each
  block's sparsity is ``1 - density`` (:func:`dlp_sparsities`); ``prune_wanda_dlp`` turns a
  sparsity ``<= 0`` into 0.01.

The hooks and the layer-sequential walk live in ``__init__.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable

import torch

from neuroal.pruning.allocation import MAX_SPARSITY, MIN_SPARSITY, spread_sparsities  # noqa: F401 - the clamps

__all__ = ["STRATEGIES", "block_importance", "block_unimportance", "dlp_sparsities"]

# `--alpha` default of the authors' main.py: block sparsities span [s - 0.15, s + 0.15] (their
# README runs LLaMA at 70% with it).
DEFAULT_ALPHA = 0.15
# `--strategy` default of the authors' main.py: the paper's unimportance is the block's median score.
DEFAULT_STRATEGY = "median"

# The reductions of the authors' `--strategy` (torch's defaults: `median` is the lower median of an
# even count, `std`/`var` are the unbiased estimates).
STRATEGIES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "median": torch.median,
    "mean": torch.mean,
    "sum": torch.sum,
    "max": torch.max,
    "std": torch.std,
    "var": torch.var,
}


def block_unimportance(scores: Sequence[torch.Tensor], strategy: str = DEFAULT_STRATEGY) -> float:
    """One block's unimportance: ``|strategy|`` of all its modules' Wanda scores pooled.

    As the authors' ``get_dlp_ratios``: the score matrices are flattened, concatenated and cast to
    float32, and one reduction (by default the median, torch's lower median) is taken over every
    entry of the block, not per module.

    Args:
        scores: the Wanda score matrices ``|W| * a`` of all linear modules of one block, any shapes,
            all on one device.
        strategy: a key of :data:`STRATEGIES`.

    Returns:
        The absolute value of the reduction, as a Python float.

    Raises:
        ValueError: on an unknown strategy, or if ``scores`` holds no entries.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown DLP strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    if sum(s.numel() for s in scores) == 0:
        raise ValueError("block_unimportance needs at least one non-empty score matrix")
    pooled = torch.cat([s.detach().flatten().float() for s in scores])
    return abs(STRATEGIES[strategy](pooled).item())


def block_importance(unimportance: Sequence[float]) -> list[float]:
    """The authors' relative importance ``1 - u_i / sum(u)`` of each block.

    Args:
        unimportance: one non-negative unimportance per block.

    Returns:
        One importance per block; all ones when every unimportance is zero (the authors divide by
        zero there).
    """
    total = sum(float(u) for u in unimportance)
    if total == 0:
        return [1.0] * len(unimportance)
    return [1 - float(u) / total for u in unimportance]


def dlp_sparsities(unimportance: Sequence[float], sparsity: float, alpha: float = DEFAULT_ALPHA) -> list[float]:
    """Per-block sparsities from per-block unimportances: more important blocks, less sparsity.

    The importances ``1 - u / sum(u)`` are mapped min-max onto ``[0, 2 * alpha]``, shifted so that
    their mean is the target density ``1 - sparsity``, and each block's sparsity is
    ``1 - density``. In closed form ``s_i = sparsity + 2 * alpha * (u_i - mean(u)) / (max u - min u)``:
    the plain mean is ``sparsity`` (blocks weighted equally, as the authors do) and the spread is
    ``2 * alpha``, unless a value had to be clamped into ``[MIN_SPARSITY, MAX_SPARSITY]`` (logged).
    All-equal unimportances, where the authors' code divides by zero, give every block the target.

    Args:
        unimportance: one unimportance per block (the scale cancels).
        sparsity: the target sparsity in ``[0, 1)``.
        alpha: half the spread of the block sparsities.

    Returns:
        One sparsity per block, in block order.

    Raises:
        ValueError: on an empty ``unimportance``, a target outside ``[0, 1)`` or a negative ``alpha``.
    """
    return spread_sparsities(block_importance(unimportance), sparsity, alpha, "DLP")
