"""Sparsity allocators (top-ups): decide how much of each module to prune; any base method
consumes the result. An allocation maps a module's full name to one sparsity, or to a tensor of
per-row sparsities. The math lives in ``owl.py`` and ``alpha.py``; this file feeds it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import torch
from torch import nn

from neuroal.digests import tensors_digest
from neuroal.files import read_tensors, write_tensors_atomic
from neuroal.models import linears_by_block
from neuroal.pruning.alpha import block_alpha, alpha_sparsities
from neuroal.pruning.owl import outlier_ratio, owl_sparsities
from neuroal.pruning.scores import wanda_score
from neuroal.pruning.sequential import layer_sequential
from neuroal.pruning.statistics import NORMS

Allocation = dict[str, Union[float, torch.Tensor]]


@dataclass
class AllocationContext:
    """What an allocator may look at: the model, its prunable modules, the target, the data.

    Allocators record what they found (OWL's ratios, the alphas, NeuroAl's search) in ``details``,
    which goes into the checkpoint's manifest.
    """

    model: nn.Module
    linears: dict[str, nn.Linear]  # prunable modules by full name, in block order
    sparsity: float
    calibration_ids: torch.Tensor | None
    device: torch.device
    batch_size: int = 8
    method: object = None  # the base method (NeuroAl prunes with it while searching)
    search_ids: torch.Tensor | None = None  # NeuroAl's search set: the first calibration windows
    options: dict = field(default_factory=dict)  # top-up options, e.g. NeuroAl's step and mode
    cache_dir: Path | None = None  # where dense-model statistics may be kept across runs
    model_digest: str | None = None  # names those caches; no digest, no cache
    details: dict = field(default_factory=dict)


def uniform(ctx: AllocationContext) -> Allocation:
    """Every prunable module at the target sparsity."""
    return {name: ctx.sparsity for name in ctx.linears}


def owl(ctx: AllocationContext) -> Allocation:
    """OWL: blocks with more Wanda-score outliers (> M x mean) are pruned less.

    The outlier ratios come from the dense model, block by block, as in the authors' code.
    """
    ratios, names = [], []
    steps = layer_sequential(ctx.model, ctx.calibration_ids, ctx.device, ctx.batch_size, frozenset((NORMS,)), "owl")
    for step in steps:
        scores = [wanda_score(lin.weight, step.stats[n].norms()) for n, lin in step.linears.items()]
        ratios.append(outlier_ratio(scores))
        names.append([f"{step.prefix}.{n}" for n in step.linears])
    ctx.details["outlier_ratios"] = ratios
    return expand_to_modules(owl_sparsities(ratios, ctx.sparsity), names)


def alpha(ctx: AllocationContext) -> Allocation:
    """AlphaPruning: blocks whose weight spectra are less heavy-tailed (higher alpha) are pruned
    more; the parameter-weighted mean stays at the target."""
    blocks = linears_by_block(ctx.model)
    alphas = [block_alpha([lin.weight.to(ctx.device) for lin in b.values()]) for b in blocks]
    params = [sum(lin.weight.numel() for lin in b.values()) for b in blocks]
    ctx.details["block_alphas"] = alphas
    return expand_to_modules(alpha_sparsities(alphas, params, ctx.sparsity), [list(b) for b in blocks])


def expand_to_modules(
    block_sparsities: list[float], module_names_by_block: list[list[str]]
) -> dict[str, float]:
    """Give every module of a block its block's sparsity.

    Args:
        block_sparsities: one sparsity per block.
        module_names_by_block: for each block, the full names of its prunable modules (e.g.
            ``model.layers.3.mlp.up_proj``), in the same block order.

    Returns:
        ``{module full name: sparsity}``, in block then module order.

    Raises:
        ValueError: if the two sequences differ in length or a module name repeats.
    """
    if len(block_sparsities) != len(module_names_by_block):
        raise ValueError(
            f"{len(block_sparsities)} block sparsities for {len(module_names_by_block)} blocks of module names"
        )
    allocation: dict[str, float] = {}
    for value, names in zip(block_sparsities, module_names_by_block):
        for name in names:
            if name in allocation:
                raise ValueError(f"module {name!r} appears in more than one block")
            allocation[name] = float(value)
    return allocation


def save_allocation(path: Path, allocation: Allocation, details: dict) -> None:
    """Write an allocation (and what the allocator found) to a safetensors file, atomically."""
    tensors = {  # a module's single sparsity as a 0-d float64 tensor; per-row tensors as they are
        name: target.detach().cpu().contiguous() if isinstance(target, torch.Tensor) else torch.tensor(float(target), dtype=torch.float64)
        for name, target in allocation.items()
    }
    metadata = {"details": json.dumps(details), "digest": tensors_digest(tensors)}
    write_tensors_atomic(path, tensors, metadata)


def load_allocation(path: Path) -> tuple[Allocation, dict] | None:
    """``(allocation, details)`` written by ``save_allocation``; None when absent or corrupt."""
    loaded = read_tensors(path)
    if loaded is None:
        return None
    tensors, metadata = loaded
    if "details" not in metadata or tensors_digest(tensors) != metadata.get("digest"):
        return None
    allocation = {name: t.item() if t.dim() == 0 else t for name, t in tensors.items()}
    return allocation, json.loads(metadata["details"])
