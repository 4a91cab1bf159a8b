"""OWL as an allocator: blocks with more Wanda-score outliers are pruned less. The outlier ratios
come from the dense model, block by block, as in the authors' code; the math is in ``math.py``."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from neuroal.pruning.allocation import expand_to_modules
from neuroal.pruning.allocators.owl.math import DEFAULT_LAMBDA, DEFAULT_M, outlier_ratio, owl_sparsities
from neuroal.pruning.layer_sequential import layer_sequential
from neuroal.pruning.methods.wanda import wanda_score
from neuroal.pruning.plugin import Allocation, AllocationInputs, Allocator
from neuroal.pruning.statistics import NORMS


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    threshold_m: float = Field(DEFAULT_M, gt=0, description="an outlier scores above M x its block's mean")
    lam: float = Field(DEFAULT_LAMBDA, gt=0, lt=0.5, description="block sparsities span the target +- lambda")


def allocate(inputs: AllocationInputs, options: Options = Options()) -> Allocation:
    """Outlier ratio per block (dense Wanda scores), spread into block sparsities."""
    ratios, names = [], []
    steps = layer_sequential(inputs.model, inputs.calibration_ids, inputs.device, inputs.batch_size,
                             frozenset((NORMS,)), "owl")
    for step in steps:
        scores = [wanda_score(lin.weight, step.stats[n].norms()) for n, lin in step.linears.items()]
        ratios.append(outlier_ratio(scores, options.threshold_m))
        names.append([f"{step.prefix}.{n}" for n in step.linears])
    targets = expand_to_modules(owl_sparsities(ratios, inputs.sparsity, options.lam), names)
    return Allocation(targets, {"outlier_ratios": ratios})


ALLOCATOR = Allocator("owl", "outlier-weighed layerwise sparsity (Yin et al., ICML 2024)", allocate, Options,
                      reads_data=True)
