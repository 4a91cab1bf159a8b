"""Masks from scores: pure functions. A mask is a bool tensor shaped like the weight; True marks a
weight to prune."""

from __future__ import annotations

import torch


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune, in every row, the ``floor(sparsity * in)`` lowest scores (stable sort, ties by index)."""
    k = int(scores.shape[1] * sparsity)  # int() truncates: the reference's floor
    return _lowest_k_per_row(scores, torch.full((scores.shape[0],), k, device=scores.device))


def per_row_mask(scores: torch.Tensor, row_sparsities: torch.Tensor) -> torch.Tensor:
    """One sparsity per output row: row r keeps its ``floor((1 - s_r) * in)`` highest scores."""
    cols = scores.shape[1]
    keep = torch.floor((1 - row_sparsities.double()) * cols).long()
    return _lowest_k_per_row(scores, cols - keep.to(scores.device))


def _lowest_k_per_row(scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Mark the ``k[r]`` lowest entries of each row r."""
    order = torch.sort(scores, dim=1, stable=True).indices
    ranks = torch.arange(scores.shape[1], device=scores.device).unsqueeze(0)
    prune_sorted = ranks < k.unsqueeze(1)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask.scatter_(1, order, prune_sorted)
    return mask
