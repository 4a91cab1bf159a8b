"""Registries of base methods (how to score and prune weights) and top-ups (how much to prune
where). Adding a method or a top-up is one entry here; the wiring in ``prune.py`` is shared."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from neuroal.errors import UserError
from neuroal.pruning import allocators, scores
from neuroal.pruning.dsnot import dsnot_refine
from neuroal.pruning.masks import nm_mask, per_row_mask, row_mask
from neuroal.pruning.sparsegpt import sparsegpt_prune
from neuroal.pruning.statistics import HESSIAN, MOMENTS, NORMS, InputStats

Target = Union[float, torch.Tensor]  # one sparsity for the module, or one per output row
Structure = Optional[tuple[int, int]]  # (n, m): prune n of every m consecutive inputs


def mask_for(scores_: torch.Tensor, target: Target, structure: Structure) -> torch.Tensor:
    """The prune mask for a score matrix: N:M, one sparsity per row, or one for all rows."""
    if structure is not None:
        return nm_mask(scores_, *structure)
    if isinstance(target, torch.Tensor):
        return per_row_mask(scores_, target)
    return row_mask(scores_, target)


@dataclass(frozen=True)
class BaseMethod:
    """A pruning rule. ``prune(weight, stats, target, structure) -> (new weight, prune mask)``;
    the caller zeros the masked entries. ``statistics``: the input statistics it reads."""

    name: str
    statistics: frozenset[str]
    prune: Callable[[torch.Tensor, Optional[InputStats], Target, Structure], tuple[torch.Tensor, torch.Tensor]]


def _score_based(name: str, score: Callable[[torch.Tensor, Optional[InputStats]], torch.Tensor], statistics) -> BaseMethod:
    def prune(weight, stats, target, structure):
        return weight, mask_for(score(weight, stats), target, structure)

    return BaseMethod(name, frozenset(statistics), prune)


def _sparsegpt(weight, stats: InputStats, target: Target, structure: Structure):
    if isinstance(target, torch.Tensor):
        raise UserError("sparsegpt takes one sparsity per module, not per-row sparsities")
    n, m = structure or (0, 0)
    return sparsegpt_prune(weight, stats.hessian, target, prune_n=n, prune_m=m)


BASE_METHODS = {
    m.name: m
    for m in (
        _score_based("magnitude", lambda w, s: scores.magnitude_score(w), ()),
        _score_based("wanda", lambda w, s: scores.wanda_score(w, s.norms()), (NORMS,)),
        _score_based("multiflow", lambda w, s: scores.multiflow_score(w, s.norms()), (NORMS,)),
        BaseMethod("sparsegpt", frozenset((HESSIAN,)), _sparsegpt),
    )
}


@dataclass(frozen=True)
class TopUp:
    """A sparsity allocator, plus an optional mask refinement applied after the base method.

    ``allocate(context) -> Allocation``. ``refine(weight, mask, stats, structure) -> mask`` keeps
    the number of pruned weights of every row, and is applied to the modules whose architecture
    role is in ``refine_roles``. ``statistics``: input statistics the refinement reads.
    ``reads_data``: the allocator runs the calibration data itself.
    """

    name: str
    allocate: Callable[[allocators.AllocationContext], allocators.Allocation]
    refine: Optional[Callable[[torch.Tensor, torch.Tensor, InputStats, Structure], torch.Tensor]] = None
    refine_roles: tuple[str, ...] = ()
    statistics: frozenset[str] = frozenset()
    reads_data: bool = False


def _dsnot_refine(weight, mask, stats: InputStats, structure: Structure):
    return dsnot_refine(weight, mask, stats.moments, structure=structure)


TOP_UPS = {
    t.name: t
    for t in (
        TopUp("uniform", allocators.uniform),
        TopUp("owl", allocators.owl, reads_data=True),
        TopUp("alpha", allocators.alpha),
        # The authors refine the attention projections only (their skip_layer="mlp").
        TopUp("dsnot", allocators.uniform, _dsnot_refine, ("attn_in", "attn_out"), frozenset((MOMENTS,))),
    )
}
TOP_UPS_PLANNED = ("neuroal",)


def needs_calibration(method: BaseMethod, top_up_: TopUp) -> bool:
    """Whether this combination reads calibration data at all (magnitude + uniform does not)."""
    return bool(method.statistics or top_up_.statistics or top_up_.reads_data)


def base_method(name: str) -> BaseMethod:
    """Look up a base method by name."""
    return _lookup("method", name, BASE_METHODS, ())


def top_up(name: str) -> TopUp:
    """Look up a top-up by name."""
    return _lookup("top-up", name, TOP_UPS, TOP_UPS_PLANNED)


def _lookup(kind: str, name: str, built: dict, planned: tuple):
    if name in built:
        return built[name]
    if name in planned:
        raise UserError(f"{kind} {name} is not built yet; available now: {', '.join(built)}")
    raise UserError(f"unknown {kind} {name!r}; choose from {', '.join([*built, *planned])}")
