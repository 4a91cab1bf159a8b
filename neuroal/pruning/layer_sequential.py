"""Walk a model's decoder blocks layer-sequentially with the statistics of each module's inputs."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from neuroal.models import Matrix, architecture_of, block_matrices, decoder_blocks
from neuroal.progress import progress
from neuroal.pruning.methods.wanda import wanda_score
from neuroal.pruning.statistics import NORMS, InputStats
from neuroal.replay import BlockInputs, capture_block_inputs, observe_inputs, onloaded, run_block


@dataclass
class BlockStep:
    """One decoder block, on the compute device, with the statistics of its modules' inputs."""

    index: int
    prefix: str  # full name of the block, e.g. "model.layers.3"
    block: nn.Module
    matrices: dict[str, Matrix]  # by name relative to the block
    stats: dict[str, InputStats]  # empty when no statistics were asked for


def layer_sequential(
    model: nn.Module,
    calibration_ids: torch.Tensor | None,
    device: torch.device,
    batch_size: int,
    kinds: frozenset[str],
    desc: str = "blocks",
) -> Iterator[BlockStep]:
    """Yield each block with its input statistics; the caller may prune it before resuming.

    Block i sees the inputs that blocks 0..i-1 produce *as they are when the caller resumes*, so
    pruning inside the loop gives the reference's layer-sequential procedure and not pruning
    gives dense statistics. With no ``kinds`` no data is run at all.
    """
    arch = architecture_of(model)
    blocks = decoder_blocks(model, arch)
    inputs = None
    if kinds:
        if calibration_ids is None:
            raise ValueError(f"statistics {sorted(kinds)} need calibration data")
        inputs = capture_block_inputs(model, blocks, calibration_ids, device, batch_size)
    for index, block in enumerate(progress(blocks, desc=desc)):
        with onloaded(block, device):
            matrices = block_matrices(block)
            stats = input_stats(block, matrices, inputs, kinds) if inputs is not None else {}
            yield BlockStep(index, f"{arch.blocks}.{index}", block, matrices, stats)
            if inputs is not None and index + 1 < len(blocks):
                inputs = run_block(block, inputs)


def input_stats(block: nn.Module, matrices: dict[str, Matrix], inputs: BlockInputs,
                kinds: frozenset[str]) -> dict[str, InputStats]:
    """The statistics of what each matrix of ``block`` reads from ``inputs``, as the block is now."""
    stats = {name: InputStats(kinds) for name in matrices}
    observe_inputs(block, matrices, inputs, lambda name, x: stats[name].add(x), outputs=False)
    return stats


def dense_wanda_scores(model: nn.Module, calibration_ids: torch.Tensor, device: torch.device, batch_size: int,
                       desc: str) -> Iterator[tuple[list[str], list[torch.Tensor]]]:
    """Per block of the dense model: its matrices' full names and their Wanda scores ``|W| * a``,
    what OWL and DLP reduce to one number per block (an expert no token reached scores 0)."""
    for step in layer_sequential(model, calibration_ids, device, batch_size, frozenset((NORMS,)), desc):
        names = [f"{step.prefix}.{n}" for n in step.matrices]
        yield names, [wanda_score(m.weight, step.stats[n].norms()) for n, m in step.matrices.items()]
