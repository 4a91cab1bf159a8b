"""The registry of top-ups: sparsity allocators (how much to prune where), some with a mask
refinement applied after the base method (DSnoT)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from neuroal.pruning import allocators
from neuroal.pruning.dsnot import dsnot_refine
from neuroal.pruning.methods import BaseMethod, Structure, lookup
from neuroal.pruning.neuroal import neuroal_allocate
from neuroal.pruning.statistics import MOMENTS, InputStats


@dataclass(frozen=True)
class TopUp:
    """A sparsity allocator, plus an optional mask refinement applied after the base method.

    ``allocate(context) -> Allocation``. ``refine(weight, mask, stats, structure) -> mask`` keeps
    the number of pruned weights of every row, and is applied to the modules whose architecture
    role is in ``refine_roles``. ``statistics``: input statistics the refinement reads.
    ``reads_data``: the allocator runs the calibration data itself; ``searches``: it reads the
    search set (the first ``search_nsamples`` calibration windows).
    """

    name: str
    allocate: Callable[[allocators.AllocationContext], allocators.Allocation]
    refine: Optional[Callable[[torch.Tensor, torch.Tensor, InputStats, Structure], torch.Tensor]] = None
    refine_roles: tuple[str, ...] = ()
    statistics: frozenset[str] = frozenset()
    reads_data: bool = False
    searches: bool = False


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
        TopUp("neuroal", neuroal_allocate, reads_data=True, searches=True),
    )
}


def needs_calibration(method: BaseMethod, top_up_: TopUp) -> bool:
    """Whether this combination reads calibration data at all (magnitude + uniform does not)."""
    return bool(method.statistics or top_up_.statistics or top_up_.reads_data)


def top_up(name: str) -> TopUp:
    """Look up a top-up by name."""
    return lookup("top-up", name, TOP_UPS)


