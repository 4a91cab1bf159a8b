"""Magnitude pruning: the smallest weights of each row go first."""

from __future__ import annotations

import torch

from neuroal.pruning.methods import score_based


def magnitude_score(weight: torch.Tensor) -> torch.Tensor:
    """``|W|``."""
    return weight.abs().float()


METHOD = score_based("magnitude", "|W|, no calibration data", lambda w, _stats: magnitude_score(w))
