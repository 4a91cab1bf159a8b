"""AlphaPruning (Lu et al. 2024): the pure math.

Blocks whose weight spectra are less heavy-tailed (higher power-law exponent ``alpha``) are
pruned more. Transcribed from ``haiquanlu/AlphaPruning``:

* ``lib/esd_utils.py`` ``net_esd_estimator(fix_fingers="xmin_peak")``: per linear module, the
  eigenvalues of ``W^T W`` (squared singular values of the float32 weight), a 100-bin histogram
  of their log10, ``xmin`` candidates up to 1.5x the left edge of the fullest bin, a Hill
  estimate of ``alpha`` for each candidate and the one with the smallest Kolmogorov-Smirnov
  distance kept (:func:`alpha_peak`);
* ``lib/prune.py`` ``ww_sparsity`` with ``mapping_type="block_wise"`` (the default of their
  ``main.py``): the block's metric is the mean of its modules' alphas, mapped min-max onto
  ``[1 - eps, 1 + eps]`` and multiplied by ``sum(params) * s / sum(params * ratio)`` so that the
  parameter-weighted mean is ``s`` (:func:`alpha_sparsities`).

The weights alone decide (no calibration data); the authors compute the alphas once on the dense
model and cache them. Hooks and loops over the model live in ``__init__.py`` beside this file.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch

logger = logging.getLogger(__name__)

__all__ = ["alpha_peak", "alpha_ratios", "alpha_sparsities", "block_alpha"]

# `bins=100` in `net_esd_estimator`: resolution of the log10-eigenvalue histogram whose fullest
# bin locates the peak of the spectral density (weightwatcher's default as well).
HISTOGRAM_BINS = 100
# `EVALS_THRESH` of `net_esd_estimator`: eigenvalues at or below it count as zeros when
# `filter_zeros` is on (off by default there and here).
EVALS_THRESH = 1e-5
# `xmin_max = 1.5 * xmin2` and `xmin_min = log10(0.95 * xmin2)` in `net_esd_estimator`: the window
# of xmin candidates around the peak (see alpha_peak for what the log10 does to the lower end).
PEAK_LOW, PEAK_HIGH = 0.95, 1.5
# `--epsilon` default of the authors' main.py and of the paper's LLaMA magnitude runs: block
# sparsities span [s(1-0.3), s(1+0.3)] before the rescaling (their wanda/sparsegpt scripts for
# LLaMA-7B pass 0.2).
DEFAULT_EPS = 0.3
# Our cap (the authors have none): after the rescaling no block loses more than 99% of its
# weights; the excess is handed to the other blocks so the weighted mean stays the target.
MAX_SPARSITY = 0.99


def alpha_peak(
    weight: torch.Tensor,
    bins: int = HISTOGRAM_BINS,
    filter_zeros: bool = False,
    evals_thresh: float = EVALS_THRESH,
) -> float:
    """Heavy-tail exponent of the empirical spectral density of ``W^T W`` ("alpha_peak").

    A line-by-line transcription of the authors' ``net_esd_estimator`` with
    ``fix_fingers="xmin_peak"`` for one ``nn.Linear`` weight:

    1. ``eigs``: squared singular values of ``W`` in float32 (``torch.linalg.svdvals`` on the
       weight's own device, then moved to the CPU), ascending.
    2. A ``bins``-bin ``torch.histc`` of ``log10(eigs)`` over ``[min, max]``; ``xmin2`` is
       ``10 ** left edge`` of the fullest bin (the first one on ties).
    3. Each eigenvalue ``xmin = eigs[i]`` but the largest, from the smallest up to the first one
       above ``1.5 * xmin2``, is a candidate, unless it is below ``log10(0.95 * xmin2)``. That lower
       bound compares an eigenvalue with a *log10*; it is the authors' (and weightwatcher's) code
       and kept as is: in practice it leaves the candidates below the peak in.
    4. Per candidate, Hill's estimate ``alpha = 1 + n / (sum(log eigs[i:]) - n * log xmin)`` with
       ``n = N - i``, and if ``alpha > 1`` the KS distance
       ``D = max |1 - (eigs[i:] / xmin) ** (1 - alpha) - arange(n) / n|`` (``D = 1`` otherwise).
    5. The alpha of the smallest ``D`` (the first on ties; index 0 if no candidate, as theirs).

    Args:
        weight: the module's weight ``[out, in]``, any float dtype, any device.
        bins: number of histogram bins.
        filter_zeros: drop eigenvalues ``<= evals_thresh`` first (unless that drops them all).
        evals_thresh: the zero threshold for ``filter_zeros``.

    Returns:
        The fitted exponent ``alpha`` of the tail density ``p(lambda) ~ lambda ** -alpha``.

    Raises:
        ValueError: on a weight that is not 2-D, has fewer than 2 singular values, or whose fit is
            not finite (e.g. an all-zero weight).
    """
    if weight.dim() != 2:
        raise ValueError(f"alpha_peak needs a 2-D weight, got shape {tuple(weight.shape)}")
    matrix = weight.detach().to(torch.float32)
    eigs = torch.square(torch.linalg.svdvals(matrix).flatten()).cpu()
    eigs, _ = torch.sort(eigs, descending=False)
    nz_eigs = eigs
    if filter_zeros:
        nz_eigs = eigs[eigs > evals_thresh]
        if len(nz_eigs) == 0:  # as the authors: if nothing is left, keep every eigenvalue
            nz_eigs = eigs
    n_eigs = len(nz_eigs)
    if n_eigs < 2:
        raise ValueError(f"alpha_peak needs at least 2 singular values, got {n_eigs}")
    log_nz_eigs = torch.log(nz_eigs)

    hist_nz_eigs = torch.log10(nz_eigs)
    if not bool(torch.isfinite(hist_nz_eigs).all()):  # the authors' torch.histc would fail here
        raise ValueError("alpha_peak: the weight has zero singular values (all zeros?); try filter_zeros=True")
    min_e, max_e = hist_nz_eigs.min(), hist_nz_eigs.max()
    counts = torch.histc(hist_nz_eigs, bins, min=min_e.item(), max=max_e.item())
    boundaries = torch.linspace(min_e.item(), max_e.item(), bins + 1)
    xmin2 = 10 ** boundaries[torch.argmax(counts)]
    xmin_min = torch.log10(PEAK_LOW * xmin2)
    xmin_max = PEAK_HIGH * xmin2

    alphas = torch.zeros(n_eigs - 1)
    ks_distances = torch.ones(n_eigs - 1)
    seq_all = torch.arange(float(n_eigs))  # float32 0, 1, ..., N-1; sliced below as torch.arange(n)
    for i in range(n_eigs - 1):
        xmin = nz_eigs[i]
        if xmin < xmin_min:
            continue
        if xmin > xmin_max:
            break
        n = float(n_eigs - i)
        seq = seq_all[: n_eigs - i]
        alpha = 1 + n / (torch.sum(log_nz_eigs[i:]) - n * log_nz_eigs[i])
        alphas[i] = alpha
        if alpha > 1:
            ks_distances[i] = torch.max(torch.abs(1 - (nz_eigs[i:] / xmin) ** (-alpha + 1) - seq / n))
    final_alpha = alphas[torch.argmin(ks_distances)].item()
    if not math.isfinite(final_alpha):
        raise ValueError("alpha_peak: the power-law fit is not finite (is the weight all zeros?)")
    return final_alpha


def block_alpha(weights: Sequence[torch.Tensor], **kwargs) -> float:
    """A block's metric: the plain mean of its modules' :func:`alpha_peak` (``block_wise`` mapping).

    Args:
        weights: the weights of all prunable linear modules of one block.
        **kwargs: passed to :func:`alpha_peak`.

    Returns:
        The mean alpha of the block's modules.
    """
    if len(weights) == 0:
        raise ValueError("block_alpha needs at least one weight")
    return sum(alpha_peak(w, **kwargs) for w in weights) / len(weights)


def alpha_ratios(block_alphas: Sequence[float], eps: float = DEFAULT_EPS) -> list[float]:
    """The authors' linear map of the block alphas onto ``[1 - eps, 1 + eps]``, before rescaling.

    ``(alpha - min) / (max - min) * 2 * eps + (1 - eps)``: the lowest alpha (most heavy-tailed, most
    structure) gets ``1 - eps``, the highest ``1 + eps``. Times the target sparsity this is the
    ``[s(1-eps), s(1+eps)]`` range of the paper. All-equal alphas, where the authors' code divides
    by zero, give 1 everywhere.

    Args:
        block_alphas: one alpha per block.
        eps: the half-width of the range, in ``[0, 1)``.

    Returns:
        One ratio per block, in block order.
    """
    if len(block_alphas) == 0:
        raise ValueError("alpha_ratios needs at least one block alpha")
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"eps must be in [0, 1), got {eps}")
    scores = torch.tensor([float(a) for a in block_alphas], dtype=torch.float64)
    if not torch.isfinite(scores).all():
        raise ValueError(f"block alphas must be finite, got {list(block_alphas)}")
    s1, s2 = 1.0 - eps, 1.0 + eps
    high, low = torch.max(scores), torch.min(scores)
    if high > low:
        ratios = ((scores - low) / (high - low)) * (s2 - s1) + s1
    else:
        ratios = torch.ones_like(scores)  # no spread to map: uniform
    return ratios.tolist()


def alpha_sparsities(
    block_alphas: Sequence[float],
    block_params: Sequence[int],
    sparsity: float,
    eps: float = DEFAULT_EPS,
    max_sparsity: float = MAX_SPARSITY,
) -> list[float]:
    """Per-block sparsities from per-block alphas; the parameter-weighted mean is the target.

    :func:`alpha_ratios` times ``scaler = sum(params) * s / sum(params * ratio)`` as in the authors'
    ``ww_sparsity`` (all in float64 here) (which works per module with each module carrying its block's
    ratio; summing a block's modules gives the same sums). Higher alpha, higher sparsity.

    Clipping: the values are never negative (``ratio >= 1 - eps > 0``). They can exceed 1 only in
    extreme cases (e.g. s = 0.7, eps = 0.3 and almost all parameters in the lowest-alpha blocks),
    where the authors would prune a block entirely; here any block above ``max_sparsity`` is pinned
    at ``max_sparsity`` and the other blocks are rescaled again to keep the weighted mean at ``s``,
    repeated until none is above (order and the weighted mean are kept; logged when it happens).

    Args:
        block_alphas: one alpha per block (e.g. :func:`block_alpha`).
        block_params: the number of prunable weights of each block (sum of its modules' ``numel``).
        sparsity: the target sparsity ``s`` in ``[0, max_sparsity)``.
        eps: the half-width of the pre-scaling range ``[s(1-eps), s(1+eps)]``, in ``[0, 1)``.
        max_sparsity: the cap on any block's sparsity, in ``(0, 1)``.

    Returns:
        One sparsity per block, in block order.

    Raises:
        ValueError: on mismatched lengths, non-positive parameter counts, or out-of-range arguments.
    """
    if len(block_alphas) != len(block_params):
        raise ValueError(f"{len(block_alphas)} block alphas for {len(block_params)} parameter counts")
    if not 0.0 < max_sparsity < 1.0:
        raise ValueError(f"max_sparsity must be in (0, 1), got {max_sparsity}")
    if not 0.0 <= sparsity < max_sparsity:
        raise ValueError(f"sparsity must be in [0, {max_sparsity}), got {sparsity}")
    if any(int(p) != p or p <= 0 for p in block_params):
        raise ValueError(f"block parameter counts must be positive integers, got {list(block_params)}")
    ratios = torch.tensor(alpha_ratios(block_alphas, eps), dtype=torch.float64)
    # float64 throughout; the authors' int64 `torch.sum(prunables) * sparsity_ratio` is float32,
    # which leaves their weighted mean ~1e-8 off the target.
    prunables = torch.tensor([int(p) for p in block_params], dtype=torch.float64)
    scaler = torch.sum(prunables) * sparsity / torch.sum(prunables * ratios)
    result = ratios * scaler

    pinned = torch.zeros_like(result, dtype=torch.bool)
    while bool((result > max_sparsity).any()):
        pinned |= result > max_sparsity
        result[pinned] = max_sparsity
        free = ~pinned  # never empty: the weighted mean stays s < max_sparsity
        budget = torch.sum(prunables) * sparsity - max_sparsity * torch.sum(prunables[pinned])
        result[free] = result[free] * (budget / torch.sum(prunables[free] * result[free]))
    if bool(pinned.any()):
        logger.warning(
            "AlphaPruning: %d block(s) capped at sparsity %.2f, the rest rescaled to keep the target",
            int(pinned.sum()),
            max_sparsity,
        )
    return result.tolist()
