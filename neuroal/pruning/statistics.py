"""Running statistics of a linear module's inputs over the calibration samples: the only thing
base methods and top-ups read from data. Which ones are collected depends on who needs them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from neuroal.pruning.dsnot import ColumnStats, add_to_stats
from neuroal.pruning.sparsegpt import add_to_hessian

NORMS, HESSIAN, MOMENTS = "norms", "hessian", "moments"


@dataclass
class InputStats:
    """Statistics of one module's inputs X (``[tokens, in]`` per sample), accumulated per batch.

    Attributes:
        kinds: which statistics to keep (``NORMS``, ``HESSIAN``, ``MOMENTS``).
        nsamples: calibration samples seen.
        sq_sum: per column, the sum over samples and tokens of ``x^2`` (for ``NORMS``).
        hessian: ``2/n * sum X^T X`` (SparseGPT's running average, for ``HESSIAN``).
        moments: DSnoT's per-column statistics (for ``MOMENTS``).
    """

    kinds: frozenset[str]
    nsamples: int = 0
    sq_sum: torch.Tensor | None = None
    hessian: torch.Tensor | None = None
    hessian_count: int = 0
    moments: ColumnStats | None = None

    def add(self, x: torch.Tensor) -> None:
        """Fold in one batch of inputs, ``[batch, tokens, in]``."""
        flat = x.reshape(-1, x.shape[-1]).float()
        self.nsamples += x.shape[0] if x.dim() == 3 else 1
        if NORMS in self.kinds:
            squares = (flat * flat).sum(dim=0)
            self.sq_sum = squares if self.sq_sum is None else self.sq_sum + squares
        if HESSIAN in self.kinds:
            self.hessian, self.hessian_count = add_to_hessian(self.hessian, self.hessian_count, x)
        if MOMENTS in self.kinds:
            self.moments = add_to_stats(self.moments, x)

    def norms(self) -> torch.Tensor:
        """Wanda's ``a``: per column ``sqrt(mean over samples of ||X_j||^2)``."""
        return torch.sqrt(self.sq_sum / self.nsamples)
