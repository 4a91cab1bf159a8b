"""Wiring: apply a base method (and a top-up's mask refinement) with an allocation, block by
block."""

from __future__ import annotations

import logging

import torch
from torch import nn

from neuroal.models import architecture_of, prunable_linears
from neuroal.pruning.allocators import Allocation
from neuroal.pruning.methods import BaseMethod, Structure
from neuroal.pruning.topups import TopUp
from neuroal.pruning.sequential import layer_sequential

logger = logging.getLogger(__name__)


@torch.no_grad()
def prune_model(
    model: nn.Module,
    method: BaseMethod,
    allocation: Allocation,
    calibration_ids: torch.Tensor | None,
    device: torch.device,
    batch_size: int = 8,
    structure: Structure = None,
    top_up: TopUp | None = None,
) -> None:
    """Prune ``model`` in place, block by block, with the reference's layer-sequential procedure.

    A top-up's refinement (DSnoT) moves mask entries after the base method; weights it regrows
    come back with their original values, so it composes with SparseGPT's updated weights too.
    """
    kinds = method.statistics | (top_up.statistics if top_up else frozenset())
    refined = _refined_modules(model, top_up)
    for step in layer_sequential(model, calibration_ids, device, batch_size, kinds, desc=f"prune {method.name}"):
        for name, linear in step.linears.items():
            original, stats = linear.weight, step.stats.get(name)
            weight, mask = method.prune(original, stats, allocation[f"{step.prefix}.{name}"], structure)
            if name in refined:
                base_mask, mask = mask, top_up.refine(original, mask, stats, structure)
                weight = torch.where(base_mask & ~mask, original, weight)
            if weight is not original:
                linear.weight.copy_(weight)
            linear.weight.masked_fill_(mask, 0)


def _refined_modules(model: nn.Module, top_up: TopUp | None) -> set[str]:
    """Block-relative names of the modules a top-up refines, from the architecture's roles."""
    if top_up is None or top_up.refine is None:
        return set()
    roles = architecture_of(model).roles()
    return {name for role in top_up.refine_roles for name in roles[role]}


def sparsity_report(model: nn.Module) -> dict:
    """Achieved sparsity over all prunable weights, and per module, counted from the weights."""
    zeros = total = 0
    modules = {}
    for name, linear in prunable_linears(model).items():
        z, n = int((linear.weight == 0).sum()), linear.weight.numel()
        modules[name] = z / n
        zeros, total = zeros + z, total + n
    return {"achieved": zeros / total, "modules": modules}
