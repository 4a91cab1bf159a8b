"""DSnoT's statistics and mask refinement, checked against the authors' procedure written out here
(github.com/zyxxmu/DSnoT ``lib/prune.py`` and ``lib/layerwrapper.py``, as NeuroAl ships it)."""

from __future__ import annotations

import math

import pytest
import torch

from neuroal.pruning.allocators.dsnot.math import dsnot_refine
from neuroal.pruning.statistics import ColumnStats, add_to_stats
from neuroal.pruning.masks import nm_mask, per_row_mask, row_mask
from neuroal.pruning.methods.wanda import wanda_score


def structured_inputs(samples: int, tokens: int, cols: int, seed: int) -> torch.Tensor:
    """Inputs whose columns have non-zero means and unequal variances, ``[samples, tokens, cols]``."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(cols, generator=g) * 0.5
    std = torch.rand(cols, generator=g) * 2 + 0.1
    return mean + std * torch.randn(samples, tokens, cols, generator=g)


def stats_of(x: torch.Tensor, batch: int = 3) -> ColumnStats:
    stats = None
    for start in range(0, x.shape[0], batch):
        stats = add_to_stats(stats, x[start : start + batch])
    return stats


# --- statistics -------------------------------------------------------------------------------


def test_stats_match_direct_formulas_over_all_tokens():
    x = structured_inputs(5, 7, 4, seed=0).double()
    stats = stats_of(x.float(), batch=2)
    flat = x.reshape(-1, 4)
    assert stats.nsamples == 5 and stats.ntokens == 35
    assert torch.allclose(stats.mean.double(), flat.mean(dim=0), atol=1e-5)
    assert torch.allclose(stats.total_var.double(), flat.var(dim=0, unbiased=False), rtol=1e-4)
    # The authors' var: each sample's biased variance over its tokens, averaged over samples.
    per_sample = torch.stack([x[s].var(dim=0, unbiased=False) for s in range(5)]).mean(dim=0)
    assert torch.allclose(stats.var.double(), per_sample, rtol=1e-4)
    assert torch.allclose(stats.sum_per_sample.double(), x.sum(dim=1).mean(dim=0), rtol=1e-4, atol=1e-5)
    assert torch.allclose(stats.wanda_norm.double(), torch.sqrt((x**2).sum(dim=1).mean(dim=0)), rtol=1e-5)


def test_stats_are_the_authors_running_updates_one_sample_per_call():
    """Transcription of ``WrappedGPT.add_batch``, called with one sample at a time as the authors do."""
    x = structured_inputs(6, 5, 3, seed=1)
    n = ntok = 0
    scaler = sum_metric = mean = var = None
    for s in range(6):
        inp = x[s].t()  # [cols, tokens]
        m, v, t = inp.mean(dim=1), inp.var(dim=1, unbiased=False), inp.shape[1]
        var = v if ntok == 0 else (var * ntok + v * t) / (ntok + t)
        mean = m if ntok == 0 else (mean * ntok + m * t) / (ntok + t)
        ntok += t
        scaler = torch.zeros(3) if scaler is None else scaler * n / (n + 1)
        sum_metric = torch.zeros(3) if sum_metric is None else sum_metric * n / (n + 1)
        n += 1
        scaler = scaler + torch.norm(inp, p=2, dim=1) ** 2 / n
        sum_metric = sum_metric + inp.sum(dim=1) / n
    stats = stats_of(x, batch=4)  # batching differently from the authors must not matter
    assert torch.allclose(stats.var, var, rtol=1e-5)
    assert torch.allclose(stats.mean, mean, rtol=1e-5, atol=1e-6)
    assert torch.allclose(stats.sum_per_sample, sum_metric, rtol=1e-5, atol=1e-6)
    assert torch.allclose(stats.wanda_norm, torch.sqrt(scaler), rtol=1e-5)


def test_two_dimensional_input_is_one_sample():
    x = structured_inputs(1, 9, 4, seed=2)
    a, b = add_to_stats(None, x[0]), add_to_stats(None, x)
    assert (a.nsamples, a.ntokens) == (1, 9)
    for field in ("col_sum", "sq_sum", "within_ss"):
        assert torch.equal(getattr(a, field), getattr(b, field))


# --- the refinement ---------------------------------------------------------------------------


def hand_stats() -> ColumnStats:
    """One sample of one token, so ``sum_per_sample`` = s, ``var`` = v and ``wanda_norm`` = a exactly
    as written (statistics need not be realisable for the algorithm)."""
    s = torch.tensor([0.15, 0.3, 0.1, 0.05, 0.1, 0.02, 0.5, 0.05])
    v = torch.tensor([0.25, 2.0, 1.0, 0.1, 1.0, 1.0, 1.0, 1.0])
    a = torch.tensor([0.1, 0.2, 0.3, 0.4, 1.0, 2.0, 0.6, 3.0])
    return ColumnStats(nsamples=1, ntokens=1, col_sum=s, sq_sum=a**2, within_ss=v)


ROW_A = [1.0, 1.0, -1.0, 1.0, -1.0, -1.0, 1.0, -1.0]
ROW_B = [1.0, 1.0, -1.0, 1.0, -1.0, -15.0, 1.0, -20.0]
HAND_W = torch.tensor([ROW_A, ROW_B, [-w for w in ROW_A]])
HAND_BASE = torch.tensor([[True] * 4 + [False] * 4] * 3)  # columns 0-3 have the lowest Wanda scores


def pruned_sets(mask: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(row).flatten().tolist()) for row in mask]


def test_hand_checked_swap_sequence():
    """Worked by hand from the authors' algorithm. Contributions c = W*s; eps = sum of pruned c.

    Row A: c = [.15, .3, -.1, .05 | -.1, -.02, .5, -.05], eps = .4. Regrow order (ascending c/var,
    kept at 0): [2, 4, 5, 6, 7, 1, 3, 0]; prune order (kept, negative c by ascending Wanda, then
    positive c by descending Wanda): [4, 5, 7, 6].
      cycle 1: eps > 0 -> regrow the back (0, c .15), prune the front (4, c -.1): eps .15
      cycle 2: |.15| > .1 -> regrow 3 (c .05), prune 5 (c -.02): eps .08
      cycle 3: |.08| <= .1 -> row A is done.
    Row C = -A: eps = -.4, so regrow from the front and prune from the back: the same swaps.
    Row B: like A but c5 = -.3, c7 = -1 (and Wanda 30, 60), prune order [4, 5, 7, 6].
      cycle 1: regrow 0, prune 4: eps .15
      cycle 2: regrow 3 (c .05), prune 5 (c -.3): eps -.2 -- flips the sign (rejected with same_sign)
      cycle 3: eps < 0 -> regrow the front (2, c -.1), prune the back (6, c .5): eps .4
      cycle 4: regrow 1 (c .3), prune 7 (c -1): eps -.9
      cycle 5: the prune pointer reaches 7, already pruned: the row stops (see the next test).
    """
    stats = hand_stats()
    expected = {
        1: [{1, 2, 3, 4}, {1, 2, 3, 4}, {1, 2, 3, 4}],
        2: [{1, 2, 4, 5}, {1, 2, 4, 5}, {1, 2, 4, 5}],
        3: [{1, 2, 4, 5}, {1, 4, 5, 6}, {1, 2, 4, 5}],
        4: [{1, 2, 4, 5}, {4, 5, 6, 7}, {1, 2, 4, 5}],
        50: [{1, 2, 4, 5}, {4, 5, 6, 7}, {1, 2, 4, 5}],
    }
    for cycles, rows in expected.items():
        assert pruned_sets(dsnot_refine(HAND_W, HAND_BASE, stats, max_cycles=cycles)) == rows, cycles
    with_sign = dsnot_refine(HAND_W, HAND_BASE, stats, same_sign=True)
    assert pruned_sets(with_sign) == [{1, 2, 4, 5}, {1, 2, 3, 4}, {1, 2, 4, 5}]


def test_exhausted_candidates_stop_the_row_instead_of_changing_its_count():
    """Deviation from the authors: in their code a pointer that runs past its candidates keeps
    writing (row B, cycle 5, would regrow 4 and 'prune' the already pruned 7, leaving 3 pruned;
    stopped row A's regrow pointer reaches the kept 7 at cycle 4 and would prune it). Here every
    row keeps its count and B ends after its 4th swap."""
    refined = dsnot_refine(HAND_W, HAND_BASE, hand_stats(), max_cycles=50)
    assert torch.equal(refined.sum(dim=1), HAND_BASE.sum(dim=1))


def reference_row(w, pruned, s, var, norm, max_cycles, threshold, same_sign):
    """The authors' unstructured loop for one row, written out with lists (well defined as long as
    no pointer runs out of candidates, which wide rows and few cycles guarantee)."""
    cols = len(w)
    c = [w[j] * s[j] for j in range(cols)]
    error = sum(c[j] for j in range(cols) if pruned[j])
    sign0 = math.copysign(1, error) if error else 0
    regrow_metric = [c[j] / var[j] if pruned[j] else 0.0 for j in range(cols)]
    regrow = sorted(range(cols), key=lambda j: (regrow_metric[j], j))
    kept = sorted((j for j in range(cols) if not pruned[j]), key=lambda j: (abs(w[j]) * norm[j], j))
    prune = [j for j in kept if c[j] < 0] + [j for j in reversed(kept) if c[j] > 0]
    front_g, back_g, front_p, back_p = 0, cols - 1, 0, len(prune) - 1
    mask = list(pruned)
    for _ in range(max_cycles):
        if abs(error) <= threshold:
            break
        if error > 0:
            g, back_g = regrow[back_g], back_g - 1
        else:
            g, front_g = regrow[front_g], front_g + 1
        if error < 0:
            p, back_p = prune[back_p], back_p - 1
        else:
            p, front_p = prune[front_p], front_p + 1
        after = error + c[p] - c[g]
        if same_sign and (math.copysign(1, after) if after else 0) != sign0:
            break
        mask[g], mask[p] = False, True
        error = after
    return mask


@pytest.mark.parametrize("same_sign", [False, True])
@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_matches_the_authors_loop_row_by_row(same_sign, sparsity):
    x = structured_inputs(4, 16, 256, seed=3)
    stats = stats_of(x)
    w = torch.randn(24, 256, generator=torch.Generator().manual_seed(4)) / 16
    base = row_mask(wanda_score(w, stats.wanda_norm), sparsity)
    refined = dsnot_refine(w, base, stats, same_sign=same_sign)
    s, var, norm = stats.sum_per_sample.tolist(), stats.var.tolist(), stats.wanda_norm.tolist()
    for r in range(w.shape[0]):
        expected = reference_row(w[r].tolist(), base[r].tolist(), s, var, norm, 50, 0.1, same_sign)
        assert refined[r].tolist() == expected, r
    assert (refined != base).any()


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.7, 0.9, 0.99])
def test_every_row_keeps_its_number_of_pruned_weights(sparsity):
    g = torch.Generator().manual_seed(5)
    x = structured_inputs(3, 8, 40, seed=6)
    stats = stats_of(x)
    w = torch.randn(30, 40, generator=g)
    base = row_mask(wanda_score(w, stats.wanda_norm), sparsity)
    for same_sign in (False, True):
        refined = dsnot_refine(w, base, stats, same_sign=same_sign)
        assert torch.equal(refined.sum(dim=1), base.sum(dim=1))


def test_rows_with_different_counts_keep_them():
    g = torch.Generator().manual_seed(7)
    stats = stats_of(structured_inputs(3, 8, 64, seed=8))
    w = torch.randn(12, 64, generator=g)
    rows = torch.tensor([0.0, 1.0, 0.05, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.97])  # incl. none and all
    base = per_row_mask(wanda_score(w, stats.wanda_norm), rows)
    refined = dsnot_refine(w, base, stats, update_threshold=0.0)
    assert torch.equal(refined.sum(dim=1), base.sum(dim=1))
    assert (refined != base).any()


def test_n_m_keeps_every_group_and_swaps():
    g = torch.Generator().manual_seed(9)
    stats = stats_of(structured_inputs(4, 16, 64, seed=10))
    w = torch.randn(32, 64, generator=g) / 8
    base = nm_mask(wanda_score(w, stats.wanda_norm), 2, 4)
    refined = dsnot_refine(w, base, stats, structure=(2, 4))
    assert torch.equal(refined.reshape(32, 16, 4).sum(dim=2), torch.full((32, 16), 2))
    assert (refined != base).any()


def test_zero_cycles_returns_the_input_and_nothing_is_modified():
    stats = stats_of(structured_inputs(2, 8, 16, seed=11))
    w = torch.randn(4, 16, generator=torch.Generator().manual_seed(12))
    base = row_mask(wanda_score(w, stats.wanda_norm), 0.5)
    w_copy, base_copy = w.clone(), base.clone()
    assert torch.equal(dsnot_refine(w, base, stats, max_cycles=0), base)
    out = dsnot_refine(w, base, stats)
    assert out.dtype == torch.bool and out is not base
    assert torch.equal(w, w_copy) and torch.equal(base, base_copy)


def test_half_precision_weights_give_the_float32_result():
    stats = stats_of(structured_inputs(2, 8, 64, seed=13))
    w = (torch.randn(16, 64, generator=torch.Generator().manual_seed(14)) / 8).bfloat16()
    base = row_mask(wanda_score(w, stats.wanda_norm), 0.5)
    assert torch.equal(dsnot_refine(w, base, stats), dsnot_refine(w.float(), base, stats))


@pytest.mark.parametrize("same_sign", [False, True])
@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_reconstruction_error_on_structured_data(same_sign, sparsity):
    """Row outputs ``(W*keep) X^T`` against ``W X^T`` on the calibration tokens, averaged over rows.

    DSnoT drives its own objective, the expected shift ``|eps|`` of each row's output, down in
    both modes. The full error also has a variance part that DSnoT does not model: with the
    sign check it goes down (here by 10% at 50% and 9% at 70%); without it (the authors' default)
    rows keep swapping past zero and the error can go either way (here -2.5% at 50%, +0.5% at
    70%), so only the sign-checked mode is held to it.
    """
    x = structured_inputs(8, 64, 576, seed=15)
    stats = stats_of(x, batch=8)
    w = torch.randn(384, 576, generator=torch.Generator().manual_seed(16)) / 24
    base = row_mask(wanda_score(w, stats.wanda_norm), sparsity)
    refined = dsnot_refine(w, base, stats, same_sign=same_sign)
    tokens = x.reshape(-1, 576)
    dense = tokens @ w.T

    def error(mask):
        return (tokens @ w.masked_fill(mask, 0).T - dense).norm(dim=0).mean().item()

    def expected_shift(mask):  # DSnoT's own objective, |eps| per row
        return (w * stats.sum_per_sample).masked_fill(~mask, 0).sum(dim=1).abs().mean().item()

    assert (refined & ~base).sum(dim=1).float().mean() >= 1  # swaps happen
    assert expected_shift(refined) < 0.5 * expected_shift(base)
    if same_sign:
        assert error(refined) <= error(base)
