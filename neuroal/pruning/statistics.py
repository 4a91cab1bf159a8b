"""Running statistics of a linear module's inputs over the calibration samples: the only thing
base methods and top-ups read from data. Which ones are collected depends on who needs them."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from neuroal.digests import tensors_digest
from neuroal.files import read_tensors, write_tensors_atomic
from neuroal.routed import Routed

logger = logging.getLogger(__name__)

NORMS, HESSIAN, MOMENTS = "norms", "hessian", "moments"


@dataclass
class InputStats:
    """Statistics of one matrix's inputs X (``[tokens, in]`` per sample), accumulated per batch.
    An expert's inputs are the tokens routed to it; it still averages over every sample of the
    batch, so that its statistics and a dense module's are on one scale.

    Attributes:
        kinds: which statistics to keep (``NORMS``, ``HESSIAN``, ``MOMENTS``).
        nsamples: calibration samples seen.
        ntokens: tokens seen (an expert no token reached has none).
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
    ntokens: int = 0

    def add(self, x: torch.Tensor | Routed) -> None:
        """Fold in one batch of inputs: ``[batch, tokens, in]``, or an expert's routed tokens."""
        routed = x if isinstance(x, Routed) else None
        x = routed.x if routed else x
        samples = routed.samples if routed else (x.shape[0] if x.dim() == 3 else 1)
        flat = x.reshape(-1, x.shape[-1]).float()
        self.nsamples += samples
        self.ntokens += flat.shape[0]
        if NORMS in self.kinds:
            squares = (flat * flat).sum(dim=0)
            self.sq_sum = squares if self.sq_sum is None else self.sq_sum + squares
        if HESSIAN in self.kinds:
            self.hessian, self.hessian_count = add_to_hessian(self.hessian, self.hessian_count, x, samples)
        if MOMENTS in self.kinds:
            self.moments = add_routed_to_stats(self.moments, routed) if routed else add_to_stats(self.moments, x)

    def norms(self) -> torch.Tensor:
        """Wanda's ``a``: per column ``sqrt(mean over samples of ||X_j||^2)``."""
        return torch.sqrt(self.sq_sum / self.nsamples)


# The accumulators, one per kind. SparseGPT's Hessian:


def add_to_hessian(
    hessian: torch.Tensor | None, count: int, x: torch.Tensor, samples: int | None = None
) -> tuple[torch.Tensor, int]:
    """Fold one batch of module inputs into the running Hessian ``H = (2 / n) sum_samples X^T X``.

    Same running-average semantics as the reference ``add_batch``: the old ``H`` is rescaled by
    ``count / (count + batch)`` and the batch added as ``(sqrt(2 / n) X)^T (sqrt(2 / n) X)``, so at
    every step ``H`` equals ``2 / n`` times the sum over all ``n`` samples so far. Float32.

    Args:
        hessian: the running ``[in, in]`` float32 Hessian, updated in place (to save a copy of a
            possibly large matrix); None before the first batch.
        count: samples folded in so far (0 before the first batch).
        x: one batch of inputs, ``[batch, tokens, in]`` (``batch`` samples) or ``[tokens, in]``
            (one sample).
        samples: the samples this batch counts as, when not its leading dimension (an expert's
            routed tokens come from every sample of the batch).

    Returns:
        ``(hessian, count)`` after this batch.
    """
    if x.dim() == 2:
        x = x.unsqueeze(0)
    batch, columns = samples or x.shape[0], x.shape[-1]
    if hessian is None:
        hessian = torch.zeros((columns, columns), dtype=torch.float32, device=x.device)
    if batch == 0:
        return hessian, count
    total = count + batch
    hessian.mul_(count / total)
    scaled = math.sqrt(2 / total) * x.reshape(-1, columns).float()
    hessian.addmm_(scaled.t(), scaled)
    return hessian, total


# DSnoT's per-column moments:


@dataclass(frozen=True)
class ColumnStats:
    """Per input column statistics of one module's calibration inputs, for DSnoT.

    A "sample" is one calibration sequence (one row of a ``[batch, tokens, in]`` batch); sums run
    over every token of every sample seen. The authors' ``WrappedGPT.add_batch`` is called with one
    sample at a time, so their per-call quantities are per-sample ones; keeping per-sample sums
    makes the result independent of how samples are batched here.

    Attributes:
        nsamples: samples seen.
        ntokens: tokens seen, over all samples.
        col_sum: ``sum_{s,t} x_{s,t,j}``.
        sq_sum: ``sum_{s,t} x_{s,t,j}^2``.
        within_ss: ``sum_s sum_t (x_{s,t,j} - mean_t x_{s,t,j})^2``, each sample about its own mean.
    """

    nsamples: int
    ntokens: int
    col_sum: torch.Tensor
    sq_sum: torch.Tensor
    within_ss: torch.Tensor

    @property
    def sum_per_sample(self) -> torch.Tensor:
        """The authors' ``sum_metric_row``: mean over samples of the sum over that sample's tokens.

        Equals ``tokens per sample * mean`` for equal-length samples. DSnoT's error ``eps`` and the
        ``update_threshold`` it is compared with are in these units.
        """
        return self.col_sum / self.nsamples

    @property
    def wanda_norm(self) -> torch.Tensor:
        """The authors' ``sqrt(scaler_row)``: ``sqrt(mean over samples of ||X_j||^2)`` (Wanda's ``a``)."""
        return torch.sqrt(self.sq_sum / self.nsamples)

    @property
    def var(self) -> torch.Tensor:
        """The authors' ``var``: per-sample biased variance over tokens, token-weighted mean over samples.

        This is the pooled *within-sample* variance, not the variance over all tokens
        (:attr:`total_var`): it leaves out how much the samples' means differ.
        """
        return self.within_ss / self.ntokens

    @property
    def mean(self) -> torch.Tensor:
        """Mean over all tokens (the authors' ``mean``; their pruning code does not read it)."""
        return self.col_sum / self.ntokens

    @property
    def total_var(self) -> torch.Tensor:
        """Biased variance over all tokens of all samples (for reference; DSnoT reads :attr:`var`)."""
        return (self.sq_sum / self.ntokens - self.mean**2).clamp_min(0)


def add_to_stats(stats: ColumnStats | None, x: torch.Tensor) -> ColumnStats:
    """Fold one batch of a module's inputs into its DSnoT statistics.

    Args:
        stats: the statistics so far, or ``None`` for the first batch.
        x: module inputs, ``[batch, tokens, in]`` (a 2-D ``[tokens, in]`` is one sample, as the
            authors' ``unsqueeze(0)``). Accumulated in float32 like the authors, on ``x``'s device.

    Returns:
        New statistics; ``stats`` is not modified.
    """
    x = x.detach().float()
    if x.dim() == 2:
        x = x.unsqueeze(0)
    x = x.reshape(-1, x.shape[-2], x.shape[-1])  # any leading dims are samples
    samples, tokens, _ = x.shape
    col_sum = x.sum(dim=(0, 1))
    sq_sum = (x * x).sum(dim=(0, 1))
    within_ss = (torch.var(x, dim=1, unbiased=False) * tokens).sum(dim=0)
    if stats is None:
        return ColumnStats(samples, samples * tokens, col_sum, sq_sum, within_ss)
    return ColumnStats(
        stats.nsamples + samples,
        stats.ntokens + samples * tokens,
        stats.col_sum + col_sum,
        stats.sq_sum + sq_sum,
        stats.within_ss + within_ss,
    )


def add_routed_to_stats(stats: ColumnStats | None, routed: Routed) -> ColumnStats:
    """``add_to_stats`` for an expert's routed tokens: each sample's tokens are its own group (their
    within-sample spread about their own mean), and every sample of the batch counts."""
    x = routed.x.detach().float()
    columns = x.shape[-1]
    per_sample = torch.zeros((routed.samples, columns), dtype=x.dtype, device=x.device).index_add_(0, routed.sample, x)
    counts = torch.bincount(routed.sample, minlength=routed.samples).to(x.dtype).unsqueeze(1)
    col_sum, sq_sum = x.sum(dim=0), (x * x).sum(dim=0)
    within_ss = sq_sum - (per_sample * per_sample / counts.clamp_min(1)).sum(dim=0)
    part = ColumnStats(routed.samples, x.shape[0], col_sum, sq_sum, within_ss.clamp_min(0))
    if stats is None:
        return part
    return ColumnStats(stats.nsamples + part.nsamples, stats.ntokens + part.ntokens, stats.col_sum + col_sum,
                       stats.sq_sum + sq_sum, stats.within_ss + part.within_ss)


def save_stats(path: Path, blocks: list[dict[str, InputStats]]) -> None:
    """Write per-block module statistics to a safetensors file (atomically, with a content digest).

    Only ``NORMS`` and ``HESSIAN`` are stored; they are all a search against the dense model reads.
    """
    tensors, counts = {}, {}
    for index, stats in enumerate(blocks):
        for name, s in stats.items():
            key = f"{index}.{name}"
            counts[key] = [s.nsamples, s.hessian_count, s.ntokens]
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
    for key, (nsamples, hessian_count, ntokens) in json.loads(metadata["counts"]).items():
        index, name = key.split(".", 1)
        if int(index) == len(blocks):
            blocks.append({})
        sq_sum, hessian = tensors.get(f"{key}.sq_sum"), tensors.get(f"{key}.hessian")
        blocks[-1][name] = InputStats(
            kinds, nsamples, sq_sum.to(device) if sq_sum is not None else None,
            hessian.to(device) if hessian is not None else None, hessian_count, ntokens=ntokens,
        )
    return blocks
