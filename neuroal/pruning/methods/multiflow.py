"""MULTIFLOW (Farina et al., CVPR 2024): Wanda's score weighted by the information flow through
the weight's input and output neurons."""

from __future__ import annotations

import torch

from neuroal.pruning.methods import score_based
from neuroal.pruning.statistics import NORMS


def multiflow_score(weight: torch.Tensor, act_norm: torch.Tensor) -> torch.Tensor:
    """MULTIFLOW's information-flow score ``|W| * outer(i_out, i_in)``.

    With ``S = |W| * a`` (Wanda's score, ``a`` broadcast over rows), ``i_out`` is the mean of each
    row of ``S`` (one value per output neuron) and ``i_in`` the mean of each column of ``S`` (one
    value per input neuron). Same formula as the NeuroAl authors' ``prune_multiflow`` (which
    uses ``torch.ger``, the old name of ``torch.outer``), computed here in float32 rather than in
    the weight's dtype.

    Args:
        weight: the module's weight, ``[out, in]``.
        act_norm: the activation norm ``a`` of each input column, ``[in]``.

    Returns:
        The float32 score matrix, ``[out, in]``.
    """
    magnitude = weight.abs().float()
    flow = magnitude * act_norm.float().unsqueeze(0)
    importance_out = flow.mean(dim=1)
    importance_in = flow.mean(dim=0)
    return magnitude * torch.outer(importance_out, importance_in)


METHOD = score_based("multiflow", "|W| x information flow of its input and output neurons",
                     lambda w, stats: multiflow_score(w, stats.norms()), (NORMS,))
