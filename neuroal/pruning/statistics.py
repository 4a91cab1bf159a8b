"""Running statistics of a linear module's inputs over the calibration samples: the only thing
base methods and top-ups read from data. Which ones are collected depends on who needs them."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from neuroal.digests import tensors_digest
from neuroal.files import read_tensors, write_tensors_atomic
from neuroal.pruning.dsnot import ColumnStats, add_to_stats
from neuroal.pruning.sparsegpt import add_to_hessian

logger = logging.getLogger(__name__)

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


def save_stats(path: Path, blocks: list[dict[str, InputStats]]) -> None:
    """Write per-block module statistics to a safetensors file (atomically, with a content digest).

    Only ``NORMS`` and ``HESSIAN`` are stored; they are all a search against the dense model reads.
    """
    tensors, counts = {}, {}
    for index, stats in enumerate(blocks):
        for name, s in stats.items():
            key = f"{index}.{name}"
            counts[key] = [s.nsamples, s.hessian_count]
            if s.sq_sum is not None:
                tensors[f"{key}.sq_sum"] = s.sq_sum.detach().cpu().contiguous()
            if s.hessian is not None:
                tensors[f"{key}.hessian"] = s.hessian.detach().cpu().contiguous()
    write_tensors_atomic(path, tensors, {"counts": json.dumps(counts), "sha256": tensors_digest(tensors)})


def load_stats(path: Path, kinds: frozenset[str], device: torch.device) -> list[dict[str, InputStats]] | None:
    """Statistics written by ``save_stats``, or None when absent, unreadable or corrupt."""
    loaded = read_tensors(path)
    if loaded is None:
        return None
    tensors, metadata = loaded
    if "counts" not in metadata or tensors_digest(tensors) != metadata.get("sha256"):
        logger.warning("ignoring corrupt statistics cache %s; recomputing", path)
        return None
    blocks: list[dict[str, InputStats]] = []
    for key, (nsamples, hessian_count) in json.loads(metadata["counts"]).items():
        index, name = key.split(".", 1)
        if int(index) == len(blocks):
            blocks.append({})
        sq_sum, hessian = tensors.get(f"{key}.sq_sum"), tensors.get(f"{key}.hessian")
        blocks[-1][name] = InputStats(
            kinds, nsamples, sq_sum.to(device) if sq_sum is not None else None,
            hessian.to(device) if hessian is not None else None, hessian_count,
        )
    return blocks
