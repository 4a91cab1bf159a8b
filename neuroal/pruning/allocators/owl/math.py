"""OWL (Yin et al. 2024, "Outlier Weighed Layerwise Sparsity"): the pure math.

Blocks whose Wanda scores hold more outliers are pruned less. Transcribed from the authors'
``prune_wanda_outlier`` in ``luuyin/OWL`` ``lib/prune_all.py``:

* per decoder block, the Wanda scores ``|W| * sqrt(scaler_row)`` of *all* its linear modules are
  flattened and concatenated; one mean is taken over that whole block (not per module), and the
  outlier ratio is the share of the block's entries strictly greater than ``Hyper_m * mean``
  (``check_outlier_mean``; the authors report it in percent, here a fraction: the min-max step
  below makes the two give identical sparsities);
* ``r = (r - min) / (max - min) * 2 * Lamda``; ``r = r - mean(r) + (1 - sparsity)`` is each
  block's density, its sparsity ``1 - r``; a sparsity ``<= 0`` becomes 0.01.

The ``layer`` variant (``--owl-variant layer``) takes one matrix as the "block": its own mean, its
own ratio, its own sparsity. The layer-sequential walk and the mapping to modules live in
``__init__.py`` beside this file.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from neuroal.pruning.allocation import MAX_SPARSITY, MIN_SPARSITY, spread_sparsities  # noqa: F401 - the clamps

# Hyper_m of the paper and of the authors' LLaMA scripts (`llama7b_wanda_owll.sh`): an entry is an
# outlier when it exceeds 5x the block's mean score (the paper's sweep found M in 3..10 robust).
DEFAULT_M = 5.0
# Lamda of the authors' scripts: block sparsities span [s - 0.08, s + 0.08]; the paper's best
# value for LLaMA at 70% (their sweep over 0.02..0.2).
DEFAULT_LAMBDA = 0.08


def outlier_ratio(scores: Sequence[torch.Tensor], m: float = DEFAULT_M) -> float:
    """Share of a block's Wanda scores that exceed ``m`` times the block's mean score.

    All modules of the block are pooled, as in the authors' ``check_outlier_mean`` on the
    concatenation of the block's flattened score matrices: one mean over every entry of every
    module, then one count over every entry. The mean is accumulated in float64 module by module
    instead of concatenating (same value up to float32 rounding, without a block-sized copy).

    Args:
        scores: the Wanda score matrices ``|W| * a`` of all linear modules of one block, any shapes,
            on any device.
        m: the outlier multiple (``Hyper_m``).

    Returns:
        The fraction in ``[0, 1]`` of the block's score entries strictly greater than
        ``m * mean`` (the authors' value divided by 100).

    Raises:
        ValueError: if ``scores`` is empty or holds no entries.
    """
    total = sum(s.numel() for s in scores)
    if total == 0:
        raise ValueError("outlier_ratio needs at least one non-empty score matrix")
    mean = sum(s.detach().sum(dtype=torch.float64).item() for s in scores) / total
    threshold = m * mean
    # Compared in float32, as the authors compare their float32 scores with a float32 threshold.
    count = sum(int((s.detach().float() > threshold).sum().item()) for s in scores)
    return count / total


def owl_sparsities(ratios: Sequence[float], sparsity: float, lam: float = DEFAULT_LAMBDA) -> list[float]:
    """Per-block sparsities from per-block outlier ratios: more outliers, less sparsity.

    The ratios are mapped min-max onto ``[0, 2 * lam]``, shifted so that their mean is the target
    density ``1 - sparsity``, and each block's sparsity is ``1 - density``: the block with the most
    outliers gets the least sparsity, the one with the fewest the most, ``2 * lam`` apart. The plain
    mean of the result equals ``sparsity`` (blocks weighted equally, as the authors do) unless a value had
    to be clamped into ``[MIN_SPARSITY, MAX_SPARSITY]`` (logged). All-equal ratios, where the
    authors' code divides by zero, give every block the target.

    Args:
        ratios: one outlier ratio per block (fraction or percent: the mapping is scale-free).
        sparsity: the target sparsity in ``[0, 1)``.
        lam: half the spread of the block sparsities (``Lamda``).

    Returns:
        One sparsity per block, in block order.

    Raises:
        ValueError: on an empty ``ratios``, a target outside ``[0, 1)`` or a negative ``lam``.
    """
    return spread_sparsities(ratios, sparsity, lam, "OWL")
