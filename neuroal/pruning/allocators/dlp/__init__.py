"""DLP as an allocator: blocks whose pooled Wanda scores have a larger median are less important
and pruned more. The medians come from the dense model, block by block, as in the authors' code;
the math is in ``math.py``."""

from __future__ import annotations

import logging
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from neuroal.pruning.allocation import block_targets
from neuroal.pruning.allocators.dlp.math import (
    DEFAULT_ALPHA,
    DEFAULT_STRATEGY,
    block_importance,
    block_unimportance,
    dlp_sparsities,
)
from neuroal.pruning.layer_sequential import dense_wanda_scores
from neuroal.pruning.plugin import Allocation, AllocationInputs, Allocator

logger = logging.getLogger(__name__)


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    alpha: float = Field(DEFAULT_ALPHA, ge=0, lt=0.5, description="block sparsities span the target +- alpha")
    strategy: Literal["median", "mean", "sum", "max", "std", "var"] = Field(
        DEFAULT_STRATEGY, description="how a block's pooled Wanda scores make its unimportance")


def allocate(inputs: AllocationInputs, options: Options = Options()) -> Allocation:
    """Unimportance per block (dense Wanda scores, pooled), spread into block sparsities."""
    unimportance, names = [], []
    for block_names, scores in dense_wanda_scores(inputs.model, inputs.calibration_ids, inputs.device,
                                                  inputs.batch_size, "dlp"):
        unimportance.append(block_unimportance(scores, options.strategy))
        names.append(block_names)
    sparsities, targets = block_targets(dlp_sparsities(unimportance, inputs.sparsity, options.alpha), names,
                                        inputs.matrix_sizes(), inputs.sparsity)
    logger.info("DLP block sparsities: %s", ", ".join(f"{s:.3f}" for s in sparsities))
    details = {"block_unimportance": unimportance, "block_importance": block_importance(unimportance),
               "block_sparsities": sparsities}
    return Allocation(targets, details)


ALLOCATOR = Allocator("dlp", "dynamic layerwise pruning, median Wanda score per block (Chen et al., ICML 2025)",
                      allocate, Options, reads_data=True)
