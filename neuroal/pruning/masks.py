"""Masks from scores: pure functions. A mask is a bool tensor shaped like the weight; True marks a
weight to prune."""

from __future__ import annotations

import math
import re

import numpy as np
import torch

from neuroal.errors import UserError


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune, in every row, the ``floor(sparsity * in)`` lowest scores (stable sort, ties by index)."""
    return lowest(scores, prune_counts(scores.shape, sparsity, scores.device))


def per_row_mask(scores: torch.Tensor, row_sparsities: torch.Tensor) -> torch.Tensor:
    """One sparsity per output row: row r keeps its ``floor((1 - s_r) * in)`` highest scores."""
    return lowest(scores, prune_counts(scores.shape, row_sparsities, scores.device))


def lowest(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """True at the ``counts[r]`` lowest scores of each row r, ties to the lower column index (the
    mask a stable sort gives).

    The threshold of each row is its ``counts[r]``-th smallest score, found by selection (one
    count for all rows) or a values-only sort (per-row counts), not by ranking every entry: the
    masks a search builds block after block, candidate after candidate.
    """
    counts = counts.to(scores.device)
    if scores.numel() == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    threshold = _kth_smallest(scores, counts)
    mask = scores <= threshold
    if torch.equal(mask.sum(dim=1), counts):
        return mask  # no tie straddles a threshold: the common case
    below, tied = scores < threshold, scores == threshold
    wanted = counts.unsqueeze(1) - below.sum(dim=1, keepdim=True)  # ties to prune, lowest index first
    return below | (tied & (tied.cumsum(dim=1) <= wanted))


def _kth_smallest(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``[rows, 1]``: the ``counts[r]``-th smallest score of each row r (-inf where it is 0).

    On the CPU numpy selects and sorts (SIMD): 3x faster than ``torch.topk`` and 6x faster than
    ``torch.sort`` on SmolLM2's matrices here.
    """
    one_count = bool((counts == counts[0]).all())
    index = (counts - 1).clamp(min=0).unsqueeze(1)
    if scores.device.type == "cpu":
        values = scores.detach()
        values = (values if values.dtype in (torch.float32, torch.float64) else values.float()).numpy()
        if one_count:
            k = int(index[0])
            kth = torch.from_numpy(np.partition(values, k, axis=1)[:, k : k + 1])
        else:
            kth = torch.from_numpy(np.take_along_axis(np.sort(values, axis=1), index.numpy(), axis=1))
    elif one_count:
        kth = torch.topk(scores, int(index[0]) + 1, dim=1, largest=False, sorted=False).values.amax(dim=1, keepdim=True)
    else:
        kth = torch.sort(scores, dim=1).values.gather(1, index)
    return kth.to(scores.dtype).masked_fill(counts.unsqueeze(1) == 0, -math.inf)


def row_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Rank of every entry within its row, 0 = lowest score (stable: ties by column index).

    Ranks depend on the scores only, so a search that tries many sparsities on fixed scores sorts
    once and builds each mask with :func:`mask_from_ranks`. Stored as int16 when a row fits.
    """
    rows, cols = scores.shape
    dtype = torch.int16 if cols <= torch.iinfo(torch.int16).max else torch.int32
    order = torch.sort(scores, dim=1, stable=True).indices
    ranks = torch.empty((rows, cols), dtype=dtype, device=scores.device)
    ranks.scatter_(1, order, torch.arange(cols, dtype=dtype, device=scores.device).expand(rows, cols))
    return ranks


# Floors forgive this much float error: a target computed as 0.6 + 0.05 is 0.6499999999999999,
# and 80 inputs at it must prune 52 weights a row, not 51.
_FLOOR_SLACK = 1e-9


def prune_counts(shape: torch.Size, sparsity, device: torch.device) -> torch.Tensor:
    """Weights to prune in each row: ``floor(s * in)`` for one sparsity (as the reference truncates
    with ``int()``), ``in - floor((1 - s_r) * in)`` for per-row sparsities."""
    rows, cols = shape
    if isinstance(sparsity, torch.Tensor):
        keep = torch.floor((1 - sparsity.double()) * cols + _FLOOR_SLACK).long()
        return (cols - keep).to(device)
    return torch.full((rows,), math.floor(cols * sparsity + _FLOOR_SLACK), dtype=torch.long, device=device)


def mask_from_ranks(ranks: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Prune the ``counts[r]`` lowest-ranked entries of each row r."""
    return ranks < counts.unsqueeze(1).to(ranks.dtype)


SAME_WIDTH_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # a float's bits, as integers


def zero_(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Set ``weight`` to +0.0 where ``mask`` is True, in place, every other bit kept: the weight's
    bits are multiplied, as integers, by the kept flags (``masked_fill_`` gives the same bytes, 5x
    slower on the CPU, where a search zeroes every matrix once per candidate)."""
    if weight.is_floating_point():
        weight.view(SAME_WIDTH_INT[weight.element_size()]).mul_(~mask)
    else:
        weight.masked_fill_(mask, 0)
    return weight


def kept_only(weight: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """A copy of ``weight`` with +0.0 where ``kept`` is False: the bytes ``zero_`` writes, out of
    place (``torch.where`` gives them too, 5x slower on the CPU, where a checkpoint is rebuilt)."""
    if weight.is_floating_point():
        return (weight.view(SAME_WIDTH_INT[weight.element_size()]) * kept).view(weight.dtype)
    return weight * kept


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M semi-structured mask: in every row, prune the ``n`` lowest of each ``m`` consecutive columns.

    Ties go to the lower column index (``torch.sort(stable=True)`` within each group), so the mask
    is the same on every device.

    Args:
        scores: ``[out, in]``; higher = more important.
        n: how many of each group to prune.
        m: the group length; ``in`` must be a multiple of it.

    Returns:
        A bool mask shaped like ``scores``, True = prune; exactly ``n`` per group.

    Raises:
        UserError: when not ``1 <= n < m`` or ``in`` is not a multiple of ``m``.
    """
    check_nm(n, m, scores.shape[1])
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)
    order = torch.sort(groups, dim=2, stable=True).indices
    prune_sorted = (torch.arange(m, device=scores.device) < n).expand_as(order)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, order, prune_sorted)
    return mask.reshape(rows, cols)


def check_nm(n: int, m: int, columns: int) -> None:
    """Raise ``UserError`` unless ``1 <= n < m`` and ``columns`` is a multiple of ``m``."""
    if not 1 <= n < m:
        raise UserError(f"N:M structure needs 1 <= N < M, got {n}:{m}")
    if columns % m:
        raise UserError(f"N:M structure {n}:{m} needs the input size to be a multiple of {m}, got {columns}")


def parse_structure(text: str) -> tuple[int, int] | None:
    """Parse the ``--structure`` value.

    Args:
        text: ``"unstructured"`` or ``"N:M"`` such as ``"2:4"``.

    Returns:
        None for unstructured, else ``(n, m)``.

    Raises:
        UserError: on anything else, or when not ``1 <= N < M``.
    """
    value = text.strip().lower()
    if value == "unstructured":
        return None
    match = re.fullmatch(r"(\d+):(\d+)", value)
    if match is None:
        raise UserError(f"--structure must be 'unstructured' or N:M such as 2:4, got {text!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 1 <= n < m:
        raise UserError(f"--structure N:M needs 1 <= N < M, got {text!r}")
    return n, m
