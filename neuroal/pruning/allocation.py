"""Allocations, whoever made them: block targets spread to modules, and the file a campaign keeps
between its allocation and prune tasks. A target is one sparsity for a module, or a tensor of
per-row sparsities."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from neuroal.digests import tensors_digest
from neuroal.files import read_tensors, write_tensors_atomic
from neuroal.pruning.plugin import Allocation

logger = logging.getLogger(__name__)

# OWL's authors' floor: a block whose sparsity comes out <= 0 is pruned at 1% instead. Our mirror
# of it at the top (the authors have none): a block never loses more than 99% of its weights.
MIN_SPARSITY = 0.01
MAX_SPARSITY = 0.99


def spread_sparsities(values: Sequence[float], sparsity: float, half_width: float, who: str) -> list[float]:
    """Block sparsities from one value per block, a larger value a denser block (OWL's outlier
    ratios, DLP's importances).

    The values are mapped min-max onto ``[0, 2 * half_width]`` and shifted so that their plain mean
    is the target density ``1 - sparsity``; each block's sparsity is ``1 - density``. All-equal
    values give every block the target. A sparsity ``<= 0`` becomes ``MIN_SPARSITY`` and one above
    ``MAX_SPARSITY`` is capped, with a warning naming ``who``: the mean then drifts off the target.

    Raises:
        ValueError: no values, a target outside ``[0, 1)`` or a negative ``half_width``.
    """
    if len(values) == 0:
        raise ValueError(f"{who} needs at least one block")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if half_width < 0:
        raise ValueError(f"{who}'s spread must be >= 0, got {half_width}")
    v = torch.tensor([float(x) for x in values], dtype=torch.float64)
    low, high = v.min(), v.max()
    scaled = (v - low) * (1 / (high - low) * half_width * 2) if high > low else torch.zeros_like(v)
    result = (1 - (scaled - scaled.mean() + (1 - sparsity))).tolist()
    clamped = [MIN_SPARSITY if s <= 0 else min(s, MAX_SPARSITY) for s in result]
    if clamped != result:
        logger.warning("%s: %d block sparsities clamped into [%.2f, %.2f]; the mean is no longer the target", who,
                       sum(a != b for a, b in zip(clamped, result)), MIN_SPARSITY, MAX_SPARSITY)
    return clamped


def at_target_by_weight(block_sparsities: Sequence[float], block_sizes: Sequence[int], sparsity: float) -> list[float]:
    """Shift block sparsities by one constant so that their mean weighted by each block's weight
    count is the target. The allocators' formulas keep the plain mean at the target, which is the
    same when blocks are equal; blocks of unequal size (a dense block among mixture-of-experts
    blocks, DeepSeek's dense first layers) would otherwise miss it. Then clamped as
    ``spread_sparsities`` clamps."""
    sizes = torch.tensor([float(n) for n in block_sizes], dtype=torch.float64)
    values = torch.tensor([float(s) for s in block_sparsities], dtype=torch.float64)
    shifted = values + (sparsity - float((values * sizes).sum() / sizes.sum()))
    if torch.allclose(shifted, values, rtol=0, atol=1e-12):
        return [float(s) for s in block_sparsities]  # equal blocks: exactly the formula's values
    return shifted.clamp(MIN_SPARSITY, MAX_SPARSITY).tolist()


def block_targets(block_sparsities: Sequence[float], names_by_block: list[list[str]], sizes: dict[str, int],
                  sparsity: float) -> tuple[list[float], dict[str, float]]:
    """``at_target_by_weight`` on the blocks (``sizes``: weights per matrix name), then every matrix
    of a block at its block's sparsity; returns the block sparsities applied and the targets."""
    weights = [sum(sizes[n] for n in names) for names in names_by_block]
    applied = at_target_by_weight(block_sparsities, weights, sparsity)
    return applied, expand_to_modules(applied, names_by_block)


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


def save_allocation(path: Path, allocation: Allocation) -> None:
    """Write an allocation (targets and details) to a safetensors file, atomically."""
    tensors = {  # a module's single sparsity as a 0-d float64 tensor; per-row tensors as they are
        name: target.detach().cpu().contiguous() if isinstance(target, torch.Tensor) else torch.tensor(float(target), dtype=torch.float64)
        for name, target in allocation.targets.items()
    }
    metadata = {"details": json.dumps(allocation.details), "seconds": str(allocation.seconds),
                "digest": tensors_digest(tensors)}
    write_tensors_atomic(path, tensors, metadata)


def load_allocation(path: Path) -> Allocation | None:
    """The allocation written by ``save_allocation``; None when absent or corrupt."""
    loaded = read_tensors(path)
    if loaded is None:
        return None
    tensors, metadata = loaded
    if "details" not in metadata or tensors_digest(tensors) != metadata.get("digest"):
        return None
    targets = {name: t.item() if t.dim() == 0 else t for name, t in tensors.items()}
    return Allocation(targets, json.loads(metadata["details"]), float(metadata.get("seconds", 0.0)))
