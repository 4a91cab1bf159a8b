"""OWL as an allocator: blocks with more Wanda-score outliers are pruned less. The outlier ratios
come from the dense model, block by block, as in the authors' code; the math is in ``math.py``."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from neuroal.pruning.allocation import block_targets
from neuroal.pruning.allocators.owl.math import DEFAULT_LAMBDA, DEFAULT_M, outlier_ratio, owl_sparsities
from neuroal.pruning.layer_sequential import dense_wanda_scores
from neuroal.pruning.plugin import Allocation, AllocationInputs, Allocator


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    threshold_m: float = Field(DEFAULT_M, gt=0, description="an outlier scores above M x its block's mean")
    lam: float = Field(DEFAULT_LAMBDA, gt=0, lt=0.5, description="block sparsities span the target +- lambda")


def allocate(inputs: AllocationInputs, options: Options = Options()) -> Allocation:
    """Outlier ratio per block (dense Wanda scores), spread into block sparsities."""
    ratios, names = [], []
    for block_names, scores in dense_wanda_scores(inputs.model, inputs.calibration_ids, inputs.device,
                                                  inputs.batch_size, "owl"):
        ratios.append(outlier_ratio(scores, options.threshold_m))
        names.append(block_names)
    applied, targets = block_targets(owl_sparsities(ratios, inputs.sparsity, options.lam), names,
                                     inputs.matrix_sizes(), inputs.sparsity)
    return Allocation(targets, {"outlier_ratios": ratios, "block_sparsities": applied})


ALLOCATOR = Allocator("owl", "outlier-weighed layerwise sparsity (Yin et al., ICML 2024)", allocate, Options,
                      reads_data=True)
