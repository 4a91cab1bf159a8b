"""Wiring: apply a base method (and an allocator's mask refinement) with an allocation, block by
block."""

from __future__ import annotations

import logging
from functools import partial
from typing import Callable

import torch
from torch import nn

from pydantic import BaseModel

from neuroal.models import architecture_of, prunable_linears
from neuroal.pruning.layer_sequential import layer_sequential
from neuroal.pruning.plugin import Allocator, BaseMethod, Structure, Target
from neuroal.pruning.statistics import InputStats

logger = logging.getLogger(__name__)


@torch.no_grad()
def prune_model(
    model: nn.Module,
    method: BaseMethod,
    targets: dict[str, Target],
    calibration_ids: torch.Tensor | None,
    device: torch.device,
    batch_size: int = 8,
    structure: Structure = None,
    allocator: Allocator | None = None,
    options: BaseModel | None = None,
) -> None:
    """Prune ``model`` in place, block by block, with the reference's layer-sequential procedure.

    ``targets``: a sparsity (or per-row sparsities) per module full name. An allocator's
    refinement (DSnoT, with its ``options``) moves mask entries after the base method; weights it
    regrows come back with their original values, so it composes with SparseGPT's updated weights.
    """
    kinds = method.statistics | (allocator.statistics if allocator else frozenset())
    refined = _refined_modules(model, allocator)
    for step in layer_sequential(model, calibration_ids, device, batch_size, kinds, desc=f"prune {method.name}"):
        for name, linear in step.linears.items():
            refine = partial(allocator.refine, options=options or allocator.Options()) if name in refined else None
            prune_linear(linear, method, step.stats.get(name), targets[f"{step.prefix}.{name}"], structure, refine)


@torch.no_grad()
def prune_linear(linear: nn.Linear, method: BaseMethod, stats: InputStats | None, target: Target,
                 structure: Structure = None, refine: Callable | None = None) -> None:
    """Prune one module in place: the method's mask (and, for SparseGPT, its updated weights), then
    ``refine(weight, mask, stats, structure) -> mask`` if given; regrown weights keep their dense value."""
    original = linear.weight
    weight, mask = method.prune(original, stats, target, structure)
    if refine is not None:
        base_mask, mask = mask, refine(original, mask, stats, structure)
        weight = torch.where(base_mask & ~mask, original, weight)
    if weight is not original:
        linear.weight.copy_(weight)
    linear.weight.masked_fill_(mask, 0)


def needs_calibration(method: BaseMethod, allocator: Allocator) -> bool:
    """Whether this combination reads calibration data at all (magnitude + uniform does not)."""
    return bool(method.statistics or allocator.statistics or allocator.reads_data)


def _refined_modules(model: nn.Module, allocator: Allocator | None) -> set[str]:
    """Block-relative names of the modules an allocator refines, from the architecture's roles."""
    if allocator is None or allocator.refine is None:
        return set()
    roles = architecture_of(model).roles()
    return {name for role in allocator.refine_roles for name in roles[role]}


def sparsity_report(model: nn.Module) -> dict:
    """Achieved sparsity over all prunable weights, and per module, counted from the weights."""
    zeros = total = 0
    modules = {}
    for name, linear in prunable_linears(model).items():
        z, n = int((linear.weight == 0).sum()), linear.weight.numel()
        modules[name] = z / n
        zeros, total = zeros + z, total + n
    return {"achieved": zeros / total, "modules": modules}
