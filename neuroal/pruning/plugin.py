"""What a plugin is. A base method decides *which* weights of a module to prune; an allocator
decides *how much* of each module (or row) to prune, and may refine the base method's masks. Each
lives in its own module (``methods/<name>.py``) or package (``allocators/<name>/``) and is listed
once in ``registry.py``; configs, the CLI and the pipeline read them from there.

An allocator's lifecycle, each hook optional beside ``allocate`` (docs/architecture.md):
``prepare`` (a cached pre-stage on the dense model: the campaign's ``prepare`` stage) ->
``allocate`` -> the pipeline prunes -> ``summary`` (its few decisive numbers, in the manifest and
MLflow) -> ``figures`` (its plots, beside the checkpoint and in the campaign report). The
pipeline, the campaign, the manifest and the report call these hooks and never name an allocator.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from neuroal.models import Matrix
from neuroal.pruning.statistics import InputStats

Target = Union[float, torch.Tensor]  # one sparsity for the module, or one per output row
Structure = Optional[tuple[int, int]]  # (n, m): prune n of every m consecutive inputs


@dataclass(frozen=True)
class BaseMethod:
    """A pruning rule.

    Attributes:
        name: The ``--method`` value.
        help: One line for ``neuroal prune --help``.
        statistics: The input statistics it reads (``statistics.NORMS``, ``HESSIAN``, ...).
        prune: ``(weight, stats, target, structure) -> (new weight, prune mask)``; the caller zeros
            the masked entries.
        score: ``(weight, stats) -> scores`` for score-based methods, so that masks at any sparsity
            follow from the scores' ranks (a search ranks once). None for solvers (SparseGPT).
    """

    name: str
    help: str
    statistics: frozenset[str]
    prune: Callable[[torch.Tensor, Optional[InputStats], Target, Structure], tuple[torch.Tensor, torch.Tensor]]
    score: Optional[Callable[[torch.Tensor, Optional[InputStats]], torch.Tensor]] = None


class NoOptions(BaseModel):
    """The options of an allocator that has none."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class AllocationInputs:
    """What an allocator may look at.

    Attributes:
        model: The dense model (an allocator leaves its weights as they were).
        matrices: Its prunable matrices by full name, in block order.
        sparsity: The target over all of them.
        method: The base method the allocation is for (NeuroAl prunes with it while searching).
        device: Where blocks are computed.
        batch_size: Calibration samples per block forward.
        calibration_ids: ``[samples, seqlen]`` calibration tokens (None when the cell reads no data).
        search_ids: The search set, the first calibration windows (allocators that search).
        cache_dir: Where statistics of the dense model may be kept across runs.
        model_digest: Names those caches; no digest, no cache.
    """

    model: nn.Module
    matrices: dict[str, Matrix]
    sparsity: float
    method: BaseMethod
    device: torch.device
    batch_size: int = 8
    calibration_ids: torch.Tensor | None = None
    search_ids: torch.Tensor | None = None
    cache_dir: Path | None = None
    model_digest: str | None = None

    def matrix_sizes(self) -> dict[str, int]:
        """Weights per matrix, by full name (block sparsities are balanced by weight count)."""
        return {name: m.weight.numel() for name, m in self.matrices.items()}


@dataclass
class Allocation:
    """An allocator's result: a target per module full name, what it found on the way (OWL's
    ratios, the alphas, NeuroAl's search; JSON-ready, recorded in the checkpoint's manifest), and
    how long it took (set by the pipeline)."""

    targets: dict[str, Target]
    details: dict = field(default_factory=dict)
    seconds: float = 0.0


@dataclass(frozen=True)
class Prepare:
    """A cached pre-stage of an allocator, run once per model and calibration set before any of
    its cells allocate (NeuroAl's dense-model statistics in dense mode).

    Attributes:
        needed: ``options -> bool``: whether these options read the stage (so the model is loaded
            only then).
        run: ``(inputs, options, stale_before) -> path``: compute the stage's file under
            ``inputs.cache_dir`` (named by ``inputs.model_digest`` and what else it depends on),
            or keep a valid one written at or after ``stale_before`` (a POSIX time); ``allocate``
            then finds it there.
    """

    needed: Callable[[BaseModel], bool]
    run: Callable[["AllocationInputs", BaseModel, float], Path]


@dataclass(frozen=True)
class Figures:
    """An allocator's plots, drawn from its ``Allocation.details`` as kept in ``neuroal.json``.

    Attributes:
        panel: ``(axes, details) -> None``: a panel beside the block sparsities of the checkpoint's
            ``allocation.png``.
        report: ``(cells, path, title) -> bool``: one campaign-report figure per model and base
            method from the report's cell dicts (``cell["manifest"]["allocation"]`` holds the
            details); False when no cell has anything to show (nothing written).
        title: What the report figure shows, e.g. "NeuroAl candidate scores".
        report_details: ``details -> details``: what of its details the report keeps (drop bulky
            per-row data).
    """

    panel: Callable[[Any, dict], None]
    report: Callable[[list[dict], Path, str], bool]
    title: str
    report_details: Callable[[dict], dict] = lambda details: details


@dataclass(frozen=True)
class Allocator:
    """A sparsity allocator (the ``--top-up`` value), plus an optional mask refinement.

    Attributes:
        name: The ``--top-up`` value; its options are ``<name>_<option>`` in configs.
        help: One line for ``neuroal prune --help``.
        allocate: ``(inputs, options) -> Allocation``.
        Options: Its typed options (pydantic, ``extra="forbid"``).
        refine: ``(weight, mask, stats, structure, options) -> mask``, applied after the base method
            to the modules whose architecture role is in ``refine_roles``; keeps each row's count.
        refine_roles: See ``refine``.
        statistics: Input statistics the refinement reads.
        reads_data: The allocator runs the calibration data itself.
        searches: ``options -> bool``: whether, with these options, it reads the search set (the
            first ``search_nsamples`` calibration windows).
        keeps_structure: Its masks keep an N:M structure (``--structure`` is allowed with it).
        prepare: Its cached pre-stage, if any (see ``Prepare``).
        summary: ``details -> dict``: its decisive numbers (NeuroAl's lambdas, ATP's beta), kept as
            the manifest's ``summary`` and logged to MLflow (numbers as metrics).
        figures: Its plots, if any (see ``Figures``).
    """

    name: str
    help: str
    allocate: Callable[[AllocationInputs, BaseModel], Allocation]
    Options: type[BaseModel] = NoOptions
    refine: Optional[Callable[..., torch.Tensor]] = None
    refine_roles: tuple[str, ...] = ()
    statistics: frozenset[str] = frozenset()
    reads_data: bool = False
    searches: Callable[[BaseModel], bool] = lambda options: False
    keeps_structure: bool = False
    prepare: Optional[Prepare] = None
    summary: Callable[[dict], dict] = lambda details: {}
    figures: Optional[Figures] = None

