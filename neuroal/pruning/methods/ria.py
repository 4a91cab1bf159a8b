"""RIA (Zhang et al., ICLR 2024, "Plug-and-Play: An Efficient Post-training Pruning Method for
Large Language Models"): the weight's relative importance within its row and its column, times
the norm of its input raised to a power ``a``.

As in the authors' ``prune_ria`` (``lib/prune.py``), the activation norm is Wanda's
``sqrt(scaler_row)`` (``InputStats.norms``) and ``a`` defaults to 0.5 (their ``--a``). Masks are
chosen per output row (their ``--per_outneuron``, Wanda's grouping), not over the whole layer as
their default, so that every allocator's per-module and per-row targets apply; N:M is the same
in both (the lowest ``n`` of each ``m`` consecutive inputs of a row). Their channel permutation
for N:M (``--reallocation``, ``--lsa``) is not implemented.
"""

from __future__ import annotations

import torch

from neuroal.pruning.methods import score_based
from neuroal.pruning.statistics import NORMS

DEFAULT_EXPONENT = 0.5  # the authors' ``--a`` default and the paper's choice
_TINY = torch.finfo(torch.float32).tiny  # denominator floor: an all-zero row or column scores 0, not NaN


def relative_importance(weight: torch.Tensor) -> torch.Tensor:
    """RIA's ``RI_ij = |W_ij| / sum_k |W_kj| + |W_ij| / sum_k |W_ik|``.

    The first term divides by the sum of ``|W|`` over column ``j`` (the authors'
    ``torch.sum(|W|, dim=0)``, all weights reading input ``j``), the second by the sum over row
    ``i`` (``torch.sum(|W|, dim=1)``, all weights feeding output ``i``).

    Args:
        weight: the module's weight, ``[out, in]``.

    Returns:
        The float32 relative importance, ``[out, in]``; 0 where a row or column is all zeros.
    """
    magnitude = weight.abs().float()
    column_sums = magnitude.sum(dim=0, keepdim=True).clamp_min(_TINY)
    row_sums = magnitude.sum(dim=1, keepdim=True).clamp_min(_TINY)
    return magnitude / column_sums + magnitude / row_sums


def ria_score(weight: torch.Tensor, act_norm: torch.Tensor, a: float = DEFAULT_EXPONENT) -> torch.Tensor:
    """RIA's score ``RI_ij * act_norm_j ** a``.

    Args:
        weight: the module's weight, ``[out, in]``.
        act_norm: the activation norm of each input column, ``[in]`` (Wanda's ``a``,
            ``sqrt(mean over samples of ||X_j||^2)``).
        a: the exponent of the activation norm.

    Returns:
        The float32 score matrix, ``[out, in]``.
    """
    return relative_importance(weight) * act_norm.float().pow(a).unsqueeze(0)


METHOD = score_based("ria", "relative importance in row and column x input norm^0.5; Plug-and-Play, ICLR 2024",
                     lambda w, stats: ria_score(w, stats.norms()), (NORMS,))
