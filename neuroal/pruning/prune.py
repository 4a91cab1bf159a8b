"""Wiring: apply a base method with an allocation to a model, block by block."""

from __future__ import annotations

import logging

import torch
from torch import nn
from tqdm.auto import tqdm

from neuroal.calibration import capture_block_inputs, input_norms, onloaded, run_block
from neuroal.models import architecture_of, block_linears, decoder_blocks, prunable_linears
from neuroal.pruning.allocators import Allocation
from neuroal.pruning.masks import per_row_mask, row_mask
from neuroal.pruning.methods import BaseMethod

logger = logging.getLogger(__name__)


@torch.no_grad()
def prune_model(
    model: nn.Module,
    method: BaseMethod,
    allocation: Allocation,
    calibration_ids: torch.Tensor | None,
    device: torch.device,
    batch_size: int = 8,
) -> None:
    """Prune ``model`` in place.

    Methods that read activations run layer-sequentially: block i is scored with the inputs that
    the already-pruned blocks 0..i-1 produce (the reference procedure), and only block i is on
    ``device`` while it is worked on.
    """
    arch = architecture_of(model)
    blocks = decoder_blocks(model, arch)
    if not method.needs_activations:
        for index, block in enumerate(tqdm(blocks, desc=f"prune {method.name}", leave=False)):
            with onloaded(block, device):
                _prune_block(block, f"{arch.blocks}.{index}", method, allocation, norms=None)
        return
    if calibration_ids is None:
        raise ValueError(f"{method.name} needs calibration data")
    inputs = capture_block_inputs(model, blocks, calibration_ids, device, batch_size)
    for index, block in enumerate(tqdm(blocks, desc=f"prune {method.name}", leave=False)):
        with onloaded(block, device):
            norms = input_norms(block, block_linears(block), inputs)
            _prune_block(block, f"{arch.blocks}.{index}", method, allocation, norms)
            inputs = run_block(block, inputs)


def _prune_block(block, prefix, method: BaseMethod, allocation: Allocation, norms) -> None:
    for name, linear in block_linears(block).items():
        scores = method.score(linear.weight, None if norms is None else norms[name])
        sparsity = allocation[f"{prefix}.{name}"]
        mask = row_mask(scores, sparsity) if isinstance(sparsity, float) else per_row_mask(scores, sparsity)
        linear.weight[mask] = 0


def sparsity_report(model: nn.Module) -> dict:
    """Achieved sparsity over all prunable weights, and per module, counted from the weights."""
    zeros = total = 0
    modules = {}
    for name, linear in prunable_linears(model).items():
        z, n = int((linear.weight == 0).sum()), linear.weight.numel()
        modules[name] = z / n
        zeros, total = zeros + z, total + n
    return {"achieved": zeros / total, "modules": modules}
