"""Wiring: apply a base method (and an allocator's mask refinement) with an allocation, block by
block; and the trial step that searches use to try a candidate on a block and take it back."""

from __future__ import annotations

import logging
from functools import partial
from typing import Callable

import torch
from pydantic import BaseModel
from torch import nn

from neuroal.models import Matrix, architecture_of, matrices_by_block
from neuroal.pruning.layer_sequential import layer_sequential
from neuroal.pruning.masks import zero_
from neuroal.pruning.methods.magnitude import METHOD as MAGNITUDE
from neuroal.pruning.plugin import Allocator, BaseMethod, Structure, Target
from neuroal.pruning.statistics import InputStats
from neuroal.replay import BlockInputs, Observed, observe_inputs, run_block

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
) -> list[str]:
    """Prune ``model`` in place, block by block, with the reference's layer-sequential procedure.

    ``targets``: a sparsity (or per-row sparsities) per matrix full name. An allocator's
    refinement (DSnoT, with its ``options``) moves mask entries after the base method; weights it
    regrows come back with their original values, so it composes with SparseGPT's updated weights.
    Returns the full names of the experts that no calibration token reached (pruned by magnitude).
    """
    kinds = method.statistics | (allocator.statistics if allocator else frozenset())
    refined = _refined_stems(model, allocator)
    unreached = []
    for step in layer_sequential(model, calibration_ids, device, batch_size, kinds, desc=f"prune {method.name}"):
        for name, matrix in step.matrices.items():
            refine = partial(allocator.refine, options=options or allocator.Options()) if matrix.stem in refined else None
            if not prune_matrix(matrix, method, step.stats.get(name), targets[f"{step.prefix}.{name}"], structure, refine):
                unreached.append(f"{step.prefix}.{name}")
    return unreached


@torch.no_grad()
def prune_matrix(matrix: Matrix, method: BaseMethod, stats: InputStats | None, target: Target,
                 structure: Structure = None, refine: Callable | None = None) -> bool:
    """Prune one matrix in place (``pruned_weight``, then ``apply_pruning``).

    Returns False when the matrix's statistics hold no token (an expert the router never chose):
    it is pruned by magnitude instead, the one method that needs no data.
    """
    weight, mask, reached = pruned_weight(matrix.weight, method, stats, target, structure, refine)
    apply_pruning(matrix, weight, mask)
    return reached


def pruned_weight(weight: torch.Tensor, method: BaseMethod, stats: InputStats | None, target: Target,
                  structure: Structure = None, refine: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``(new weight, prune mask, reached)``: the method's mask (and, for SparseGPT, its updated
    weights), then ``refine(weight, mask, stats, structure) -> mask`` if given, regrown weights with
    their dense value; magnitude where the statistics saw no token (``reached`` False)."""
    method, stats, reached = method_for(method, stats)
    new, mask = method.prune(weight, stats, target, structure)
    if refine is not None and reached:
        base_mask, mask = mask, refine(weight, mask, stats, structure)
        new = torch.where(base_mask & ~mask, weight, new)
    return new, mask, reached


def apply_pruning(matrix: Matrix, weight: torch.Tensor, mask: torch.Tensor) -> None:
    """Write a pruned weight into ``matrix`` in place: its new values, zeros (+0.0) where masked."""
    if weight is not matrix.weight:
        matrix.weight.copy_(weight)
    zero_(matrix.weight, mask)


Pruner = Callable[[str, Matrix], tuple[torch.Tensor, torch.Tensor]]  # (name, matrix) -> (weight, prune mask)


@torch.no_grad()
def trial_block(block: nn.Module, matrices: dict[str, Matrix], inputs: BlockInputs, prune: Pruner,
                observe: Callable[[str, Observed], None] | None = None) -> BlockInputs:
    """Try a candidate on one block: prune each matrix as ``prune`` says, run the block on
    ``inputs`` (calling ``observe(name, x)`` with what each matrix reads), and give the block its
    dense weights back. Returns the block's outputs: the next block's inputs under this candidate.

    The one trial step of every search that prunes layer-sequentially (NeuroAl's block and row
    steps, ATP's beta): the model is left as it was, and only one block's dense copy is held.
    """
    dense = {name: m.weight.clone() for name, m in matrices.items()}
    try:
        for name, m in matrices.items():
            apply_pruning(m, *prune(name, m))
        return run_block(block, inputs) if observe is None else observe_inputs(block, matrices, inputs, observe)
    finally:
        for name, m in matrices.items():
            m.weight.copy_(dense[name])


def method_for(method: BaseMethod, stats: InputStats | None) -> tuple[BaseMethod, InputStats | None, bool]:
    """``(method, stats, True)``, or magnitude and no statistics when they saw no token."""
    if stats is None or stats.ntokens:
        return method, stats, True
    return MAGNITUDE, None, False


def needs_calibration(method: BaseMethod, allocator: Allocator) -> bool:
    """Whether this combination reads calibration data at all (magnitude + uniform does not)."""
    return bool(method.statistics or allocator.statistics or allocator.reads_data)


def _refined_stems(model: nn.Module, allocator: Allocator | None) -> set[str]:
    """Block-relative stems of the matrices an allocator refines, from the architecture's roles."""
    if allocator is None or allocator.refine is None:
        return set()
    roles = architecture_of(model).roles()
    return {name for role in allocator.refine_roles for name in roles[role]}


def sparsity_report(model: nn.Module) -> dict:
    """Achieved sparsity over all prunable weights, per block and per matrix (each expert's
    included), counted from the weights."""
    modules, blocks = {}, []
    for block in matrices_by_block(model):
        block_zeros = block_total = 0
        for name, matrix in block.items():
            z, n = int((matrix.weight == 0).sum()), matrix.weight.numel()
            modules[name] = z / n
            block_zeros, block_total = block_zeros + z, block_total + n
        blocks.append((block_zeros, block_total))
    zeros, total = sum(z for z, _ in blocks), sum(n for _, n in blocks)
    return {"achieved": zeros / total, "blocks": [z / n for z, n in blocks], "modules": modules}
