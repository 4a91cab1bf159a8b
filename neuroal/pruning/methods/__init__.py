"""Base methods: one module each, exposing ``METHOD`` (a ``plugin.BaseMethod``) and its pure math.
Listed in ``neuroal.pruning.registry``."""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch

from neuroal.pruning.masks import nm_mask, per_row_mask, row_mask
from neuroal.pruning.plugin import BaseMethod, Structure, Target
from neuroal.pruning.statistics import InputStats

Score = Callable[[torch.Tensor, Optional[InputStats]], torch.Tensor]


def mask_for(scores: torch.Tensor, target: Target, structure: Structure) -> torch.Tensor:
    """The prune mask for a score matrix: N:M, one sparsity per row, or one for all rows."""
    if structure is not None:
        return nm_mask(scores, *structure)
    if isinstance(target, torch.Tensor):
        return per_row_mask(scores, target)
    return row_mask(scores, target)


def score_based(name: str, help: str, score: Score, statistics: Iterable[str] = ()) -> BaseMethod:
    """A method that prunes the lowest scores of each row (N:M group): Wanda and its kin."""

    def prune(weight, stats, target, structure):
        return weight, mask_for(score(weight, stats), target, structure)

    return BaseMethod(name, help, frozenset(statistics), prune, score)
