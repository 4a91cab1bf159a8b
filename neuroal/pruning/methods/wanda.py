"""Wanda (Sun et al., ICLR 2024, "A Simple and Effective Pruning Approach for Large Language
Models"): weights times the norm of the input they multiply."""

from __future__ import annotations

import torch

from neuroal.pruning.methods import score_based
from neuroal.pruning.statistics import NORMS


def wanda_score(weight: torch.Tensor, act_norm: torch.Tensor) -> torch.Tensor:
    """``|W| * a``, with ``a`` the per-input-column activation norm broadcast over rows."""
    return weight.abs().float() * act_norm.float().unsqueeze(0)


METHOD = score_based("wanda", "|W| x input norm", lambda w, stats: wanda_score(w, stats.norms()), (NORMS,))
