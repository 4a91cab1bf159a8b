"""OWL as an allocator: layers with more Wanda-score outliers are pruned less; the math is in
``math.py``.

Two variants, both read from the dense model's Wanda scores:

* ``block`` (the default; the authors' released ``prune_wanda_outlier``, and what they say OWL is):
  one outlier ratio per decoder block, pooled over all of its linear layers, and one sparsity per
  block. On LLaMA-7B at 70% it reached perplexity 24.1 (luuyin/OWL issue 12);
* ``layer``: each linear layer (each expert too) its own outlier ratio, over its own mean score,
  and its own sparsity, spread over all the model's linear layers at once. The paper's appendix C
  reports perplexity 86.3 for it on LLaMA-7B at 70% (its table's titles are swapped: issues 9, 12).

Either way the sparsities are then shifted to the target by weight count. The variant run is
recorded in the allocation's details (and so in the checkpoint's manifest).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from neuroal.pruning.allocation import block_targets
from neuroal.pruning.allocators.owl.math import DEFAULT_LAMBDA, DEFAULT_M, outlier_ratio, owl_sparsities
from neuroal.pruning.layer_sequential import dense_wanda_scores
from neuroal.pruning.plugin import Allocation, AllocationInputs, Allocator


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    threshold_m: float = Field(DEFAULT_M, gt=0, description="an outlier scores above M x its block's (layer's) mean")
    lam: float = Field(DEFAULT_LAMBDA, gt=0, lt=0.5, description="block (layer) sparsities span the target +- lambda")
    variant: Literal["block", "layer"] = Field(
        "block", description="one outlier ratio and sparsity per decoder block, or per linear layer")


def allocate(inputs: AllocationInputs, options: Options = Options()) -> Allocation:
    """Outlier ratios from the dense Wanda scores, per block or per layer, spread into sparsities."""
    groups, ratios = _outlier_ratios(inputs, options)
    applied, targets = block_targets(owl_sparsities(ratios, inputs.sparsity, options.lam), groups,
                                     inputs.matrix_sizes(), inputs.sparsity)
    if options.variant == "layer":
        return Allocation(targets, {"variant": "layer",
                                    "outlier_ratios": {group[0]: r for group, r in zip(groups, ratios, strict=True)}})
    return Allocation(targets, {"variant": "block", "outlier_ratios": ratios, "block_sparsities": applied})


def _outlier_ratios(inputs: AllocationInputs, options: Options) -> tuple[list[list[str]], list[float]]:
    """The groups of matrices that share a sparsity (a block's, or each matrix alone) and the outlier
    ratio of each; one block's scores are held at a time."""
    groups, ratios = [], []
    for names, scores in dense_wanda_scores(inputs.model, inputs.calibration_ids, inputs.device,
                                            inputs.batch_size, "owl"):
        if options.variant == "block":
            pairs = [(names, scores)]
        else:
            pairs = [([name], [score]) for name, score in zip(names, scores, strict=True)]
        for group, group_scores in pairs:
            groups.append(group)
            ratios.append(outlier_ratio(group_scores, options.threshold_m))
    return groups, ratios


ALLOCATOR = Allocator("owl", "outlier-weighed layerwise sparsity (Yin et al., ICML 2024)", allocate, Options,
                      reads_data=True, summary=lambda details: {"variant": details["variant"]})
