"""How a search walks a list of candidate values (NeuroAl's lambdas, ATP's betas): every one
(``grid``), or a golden-section walk (``coarse``) that probes 4-6 of NeuroAl's 14-15 and finds
the grid's minimum on a curve with a single one. A walk is a generator of grid indices; the caller
sends back the best index so far."""

from __future__ import annotations

from collections.abc import Generator, Sequence

Walk = Generator[int, int, None]


def grid_walk(values: Sequence[float]) -> Walk:
    """Every grid index in order (the exhaustive search); what the caller sends back is not needed."""
    for index in range(len(values)):
        yield index


_GOLDEN = (3 - 5 ** 0.5) / 2  # 0.382: where golden-section search places its next probe


def coarse_walk(values: Sequence[float]) -> Walk:
    """Grid indices for a golden-section search over the lambda ``values``.

    The best point so far and its nearest probed neighbours (worse, on a single-minimum curve)
    bracket the minimum; the next probe is the grid point nearest to 0.382 of the way from the
    best point into the longer side of the bracket, and the search ends when both neighbours of
    the best point are probed. Distances are in lambda, not grid steps: the grid is finer below
    0.10, and the curve is smooth in lambda. Every index is probed at most once.
    """
    first = _nearest(values, range(len(values)), values[0] + _GOLDEN * (values[-1] - values[0]))
    tried = {first}
    best = yield first
    while True:
        lo = max((i for i in tried if i < best), default=-1) + 1
        hi = min((i for i in tried if i > best), default=len(values)) - 1
        left, right = values[best] - values[lo], values[hi] - values[best]
        if left == right == 0:
            return
        if right >= left:
            probe = _nearest(values, range(best + 1, hi + 1), values[best] + _GOLDEN * right)
        else:
            probe = _nearest(values, range(lo, best), values[best] - _GOLDEN * left)
        tried.add(probe)
        best = yield probe


def _nearest(values: Sequence[float], indices, target: float) -> int:
    """The index among ``indices`` whose value is nearest to ``target`` (the lower one on a tie)."""
    return min(indices, key=lambda i: (abs(values[i] - target), i))


WALKS = {"grid": grid_walk, "coarse": coarse_walk}
