"""DSnoT (Zhang et al. 2024, "Dynamic Sparse No Training"): training-free prune-and-regrow on top
of a base mask. Pure functions on tensors, transcribed from the authors' ``lib/prune.py`` and
``lib/layerwrapper.py`` (github.com/zyxxmu/DSnoT, ``prune_DSnoT``), vectorised over rows as theirs.

The idea, per output row ``i``: the pruned weights shift the row's output by, in expectation over
tokens, ``eps_i = sum_{j pruned} W_ij * E[x_j]`` (the authors use the per-sample *sum* over tokens,
see :class:`ColumnStats`). Each cycle regrows one pruned weight and prunes one kept weight to
shrink ``|eps_i|``:

- regrow: if ``eps > 0`` the pruned weight with the largest ``W_ij E[x_j] / Var(x_j)^p``, else the
  one with the smallest (most negative);
- prune: among kept weights whose ``W_ij E[x_j]`` has the sign opposite to ``eps``, the one with the
  lowest Wanda score ``|W_ij| * ||x_j||`` (always Wanda, whatever the base method). Once that side
  runs out, the authors' ordering continues into the other side *starting from its highest Wanda
  score*, which can prune a row's most important weight; kept as they wrote it;
- a row stops for good once ``|eps| <= update_threshold`` before a swap (and, in the authors'
  optional mode, once a swap would flip the sign of ``eps``); all rows stop after ``max_cycles``.

Candidates are visited in a fixed order computed once from the base mask (two pointers per list,
one from each end), exactly as the authors do; the ordering is not recomputed after swaps.

Which modules to refine is the caller's choice: the authors' shipped default (``--skip_layer mlp``,
which NeuroAl's ``main.py`` forces for Llama-like models) refines only the attention projections
and leaves the MLP ones with their base mask.
"""

from __future__ import annotations

import torch

from neuroal.pruning.statistics import ColumnStats

MAX_CYCLES = 50  # the authors' README command and their later main.py default (--max_cycle_time)
UPDATE_THRESHOLD = 0.1  # same source (--update_threshold); absolute, in units of the error eps
POW_OF_VAR = 1.0  # same source (--pow_of_var_regrowing): divide the regrow metric by Var^1


@torch.no_grad()
def dsnot_refine(
    weight: torch.Tensor,
    prune_mask: torch.Tensor,
    stats: ColumnStats,
    max_cycles: int = MAX_CYCLES,
    update_threshold: float = UPDATE_THRESHOLD,
    pow_of_var: float = POW_OF_VAR,
    *,
    same_sign: bool | None = None,
    structure: tuple[int, int] | None = None,
    base_score: torch.Tensor | None = None,
) -> torch.Tensor:
    """Refine a prune mask with DSnoT's prune-and-regrow cycles.

    Every accepted swap regrows one pruned weight and prunes one kept weight of the same row, so
    every row keeps exactly its number of pruned weights (and, with ``structure``, every group of
    ``m`` keeps its ``n``). The weights are not changed; the caller zeros the masked ones.

    Args:
        weight: ``[out, in]`` weights the base mask was computed for (any float dtype; the
            metrics are computed in float32 on its device).
        prune_mask: bool ``[out, in]``, True = pruned. Rows may have different counts.
        stats: the module's :class:`ColumnStats` (from :func:`add_to_stats`).
        max_cycles: at most this many swaps per row (the authors' ``max_cycle_time``).
        update_threshold: a row stops once ``|eps| <=`` this before a swap, ``eps`` in the units
            of :attr:`ColumnStats.sum_per_sample`.
        pow_of_var: power of the variance dividing the regrow metric; 0 disables it.
        same_sign: also stop a row when a swap would flip the sign of ``eps`` (the authors'
            ``not without_same_sign``). ``None``: the authors' defaults, off for unstructured
            (their ``without_same_sign`` defaults to True), on for N:M (their N:M branch always
            checks it).
        structure: ``(n, m)`` if ``prune_mask`` is N:M (n pruned in every m consecutive inputs);
            the pruned weight is then chosen inside the regrown weight's group of m.
        base_score: N:M only, the base method's importance score (higher = kept longer) that picks
            the weight to prune inside the group, as the authors' ``initial_metric``; defaults to
            the Wanda score. Ignored for unstructured masks, where the authors always use Wanda.

    Returns:
        The new bool prune mask, on ``prune_mask``'s device.
    """
    if prune_mask.shape != weight.shape:
        raise ValueError(f"mask {tuple(prune_mask.shape)} does not match weight {tuple(weight.shape)}")
    device = weight.device
    mask = prune_mask.to(device=device, dtype=torch.bool).clone()
    if max_cycles <= 0 or mask.numel() == 0:
        return mask.to(prune_mask.device)
    w = weight.detach().float()
    contribution = w * stats.sum_per_sample.to(device).float().unsqueeze(0)  # the authors' DSnoT_metric
    regrow_metric = torch.where(mask, contribution, torch.zeros_like(contribution))
    error = regrow_metric.sum(dim=1, keepdim=True)  # eps: expected output shift of the pruned weights
    error_sign = torch.sign(error)
    if pow_of_var:
        regrow_metric = regrow_metric / torch.pow(stats.var.to(device).float().unsqueeze(0), pow_of_var)
        # Kept weights must stay at 0 (a zero-variance column would give 0/0 = nan there); a pruned
        # weight in a dead column (0/0) contributes nothing either.
        finite_or_inf = torch.nan_to_num(regrow_metric, nan=0.0, posinf=torch.inf, neginf=-torch.inf)
        regrow_metric = torch.where(mask, finite_or_inf, 0.0)
    regrow_order = torch.sort(regrow_metric, dim=1, stable=True).indices
    wanda = w.abs() * stats.wanda_norm.to(device).float().unsqueeze(0)

    if structure is None:
        return _unstructured(mask, contribution, error, error_sign, regrow_order, wanda, max_cycles,
                             update_threshold, bool(same_sign)).to(prune_mask.device)
    score = wanda if base_score is None else base_score.to(device).float()
    check_sign = True if same_sign is None else same_sign
    return _n_m(mask, contribution, error, error_sign, regrow_order, score, structure[1], max_cycles,
                update_threshold, check_sign).to(prune_mask.device)


def _unstructured(mask, contribution, error, error_sign, regrow_order, wanda, max_cycles, threshold, same_sign):
    """The authors' unstructured branch: regrow from the sorted regrow metric, prune by Wanda."""
    rows, cols = mask.shape
    keep = (~mask).sum(dim=1, keepdim=True)
    # Kept weights in ascending Wanda score (pruned ones last, as the authors' scatter of inf).
    by_wanda = torch.sort(wanda.masked_fill(mask, torch.inf), dim=1, stable=True).indices
    position = torch.arange(cols, device=mask.device).expand(rows, cols)
    sign = torch.sign(contribution.gather(1, by_wanda))
    # The authors' return_reorder_indice: kept weights with a negative contribution in ascending
    # Wanda order, then the positive ones in descending Wanda order; so the front holds the cheapest
    # negative one and the back the cheapest positive one. Zero contributions go in between.
    category = torch.where(sign < 0, 0, torch.where(sign == 0, 1, 2))
    category = torch.where(position < keep, category, 3)  # pruned weights: never candidates
    within = torch.where(category == 2, cols - 1 - position, position)
    key = category * cols + within  # unique per row: one sort orders by (category, within)
    prune_order = by_wanda.gather(1, torch.sort(key, dim=1).indices)

    regrow_ends = torch.stack([torch.zeros_like(keep[:, 0]), torch.full_like(keep[:, 0], cols - 1)], dim=1)
    prune_ends = torch.cat([torch.zeros_like(keep), keep - 1], dim=1)
    step = torch.tensor([[1, -1]], device=mask.device)  # front pointer moves right, back pointer left
    active = torch.ones_like(error, dtype=torch.bool)
    for _ in range(max_cycles):
        if not bool(active.any()):
            break
        regrow_side = (error > 0).long()  # eps > 0: regrow the largest positive metric (back end)
        regrow_at = regrow_ends.gather(1, regrow_side)
        regrow_ends.scatter_(1, regrow_side, regrow_at + step.expand(rows, 2).gather(1, regrow_side))
        prune_side = (error < 0).long()  # eps < 0: prune the cheapest positive contribution (back end)
        prune_at = prune_ends.gather(1, prune_side)
        prune_ends.scatter_(1, prune_side, prune_at + step.expand(rows, 2).gather(1, prune_side))
        in_range = (regrow_at >= 0) & (regrow_at < cols) & (prune_at >= 0) & (prune_at < keep)
        regrow_idx = regrow_order.gather(1, regrow_at.clamp(0, cols - 1))
        prune_idx = prune_order.gather(1, prune_at.clamp(0, cols - 1))
        active = _accept(mask, contribution, error, error_sign, active, in_range, regrow_idx, prune_idx,
                         threshold, same_sign)
    return mask


def _n_m(mask, contribution, error, error_sign, regrow_order, score, m, max_cycles, threshold, same_sign):
    """The authors' N:M branch: regrow from the sorted regrow metric, prune the lowest base score
    still kept in the regrown weight's group of m, so every group keeps its n pruned."""
    rows, cols = mask.shape
    if cols % m:
        raise ValueError(f"{cols} inputs are not a whole number of groups of {m}")
    # Originally pruned weights and weights pruned by a swap are never pruned again: inf, as the
    # authors' scatter of inf (their "max + 1" after a swap is inf too).
    candidate_score = score.masked_fill(mask, torch.inf)
    regrow_ends = torch.tensor([[0, cols - 1]], device=mask.device).repeat(rows, 1)
    step = torch.tensor([[1, -1]], device=mask.device).expand(rows, 2)  # front right, back left
    offsets = torch.arange(m, device=mask.device).unsqueeze(0)
    active = torch.ones_like(error, dtype=torch.bool)
    for _ in range(max_cycles):
        if not bool(active.any()):
            break
        regrow_side = (error > 0).long()
        regrow_at = regrow_ends.gather(1, regrow_side)
        regrow_ends.scatter_(1, regrow_side, regrow_at + step.gather(1, regrow_side))
        in_range = (regrow_at >= 0) & (regrow_at < cols)
        regrow_idx = regrow_order.gather(1, regrow_at.clamp(0, cols - 1))
        group = regrow_idx - regrow_idx % m + offsets  # [rows, m]
        lowest = candidate_score.gather(1, group)
        in_range &= torch.isfinite(lowest.min(dim=1, keepdim=True).values)  # the group has a candidate
        prune_idx = group.gather(1, lowest.argmin(dim=1, keepdim=True))
        active = _accept(mask, contribution, error, error_sign, active, in_range, regrow_idx, prune_idx,
                         threshold, same_sign)
        candidate_score.scatter_(1, prune_idx, torch.where(active, torch.inf, candidate_score.gather(1, prune_idx)))
    return mask


def _accept(mask, contribution, error, error_sign, active, in_range, regrow_idx, prune_idx, threshold, same_sign):
    """Decide the swap of every row, apply the accepted ones to ``mask`` and ``error`` in place, and
    return which rows stay active (a row that declines once is done, as the authors')."""
    regrow_value = contribution.gather(1, regrow_idx)
    prune_value = contribution.gather(1, prune_idx)
    accept = active & (error.abs() > threshold)
    if same_sign:
        accept &= error_sign == torch.sign(error + prune_value - regrow_value)
    # Not in the authors' code, where it holds whenever the candidate lists are not exhausted: the
    # regrown weight must be pruned now and the pruned one kept now, else the row stops. This keeps
    # every row's count exact on small or very sparse matrices.
    accept &= in_range & mask.gather(1, regrow_idx) & ~mask.gather(1, prune_idx)
    mask.scatter_(1, prune_idx, mask.gather(1, prune_idx) | accept)
    mask.scatter_(1, regrow_idx, mask.gather(1, regrow_idx) & ~accept)
    error += torch.where(accept, prune_value, torch.zeros_like(prune_value))  # two steps, as the authors'
    error -= torch.where(accept, regrow_value, torch.zeros_like(regrow_value))
    return accept
