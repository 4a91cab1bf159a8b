"""The registry of base methods: how to score and prune a module's weights. Adding a method is one
entry here; the wiring in ``prune.py`` is shared. Top-ups are registered in ``topups.py``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from neuroal.errors import UserError
from neuroal.pruning import scores
from neuroal.pruning.masks import nm_mask, per_row_mask, row_mask
from neuroal.pruning.sparsegpt import sparsegpt_prune
from neuroal.pruning.statistics import HESSIAN, NORMS, InputStats

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
    # Score-based methods also expose ``score(weight, stats)``: masks at any sparsity then follow
    # from the scores' ranks, which a search can sort once. None for solvers (SparseGPT).
    score: Optional[Callable[[torch.Tensor, Optional[InputStats]], torch.Tensor]] = None


def _score_based(name: str, score: Callable[[torch.Tensor, Optional[InputStats]], torch.Tensor], statistics) -> BaseMethod:
    def prune(weight, stats, target, structure):
        return weight, mask_for(score(weight, stats), target, structure)

    return BaseMethod(name, frozenset(statistics), prune, score)


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


def base_method(name: str) -> BaseMethod:
    """Look up a base method by name."""
    return lookup("method", name, BASE_METHODS)


def lookup(kind: str, name: str, registry: dict):
    """Find ``name`` in a registry, or say in one line what exists."""
    if name in registry:
        return registry[name]
    raise UserError(f"unknown {kind} {name!r}; choose from {', '.join(registry)}")
