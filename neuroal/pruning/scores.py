"""Importance scores: pure functions of a weight matrix (out x in) and calibration statistics.
Higher score = more important = kept longer."""

from __future__ import annotations

import torch


def magnitude_score(weight: torch.Tensor) -> torch.Tensor:
    """``|W|``."""
    return weight.abs().float()


def wanda_score(weight: torch.Tensor, act_norm: torch.Tensor) -> torch.Tensor:
    """``|W| * a``, with ``a`` the per-input-column activation norm broadcast over rows (Wanda)."""
    return weight.abs().float() * act_norm.float().unsqueeze(0)
