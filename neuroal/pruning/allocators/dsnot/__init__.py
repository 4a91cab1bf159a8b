"""DSnoT as a top-up: the uniform allocation, then prune-and-regrow cycles on the base method's
masks of the attention projections (the authors' default). The math is in ``math.py``."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from neuroal.pruning.allocators.dsnot.math import MAX_CYCLES, POW_OF_VAR, UPDATE_THRESHOLD, dsnot_refine
from neuroal.pruning.allocators.uniform import allocate
from neuroal.pruning.plugin import Allocator, Structure
from neuroal.pruning.statistics import MOMENTS, InputStats


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_cycles: int = Field(MAX_CYCLES, ge=0, description="prune-and-regrow swaps per row at most")
    update_threshold: float = Field(UPDATE_THRESHOLD, ge=0, description="a row stops once |error| is below this")
    pow_of_var: float = Field(POW_OF_VAR, ge=0, description="regrow metric divided by Var(x)^p")


def refine(weight: torch.Tensor, mask: torch.Tensor, stats: InputStats, structure: Structure,
           options: Options = Options()) -> torch.Tensor:
    """The base method's mask after DSnoT's cycles (same count per row)."""
    return dsnot_refine(weight, mask, stats.moments, options.max_cycles, options.update_threshold, options.pow_of_var,
                        structure=structure)


# The authors refine the attention projections only (their skip_layer="mlp").
ALLOCATOR = Allocator("dsnot", "uniform, then DSnoT's prune-and-regrow on attention (Zhang et al., ICLR 2024)",
                      allocate, Options, refine=refine, refine_roles=("attn_in", "attn_out"),
                      statistics=frozenset((MOMENTS,)), keeps_structure=True)
