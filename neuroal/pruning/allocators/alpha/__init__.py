"""AlphaPruning as an allocator: blocks whose weight spectra are less heavy-tailed (higher alpha)
are pruned more; the parameter-weighted mean stays at the target. The math is in ``math.py``."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from neuroal.models import matrices_by_block
from neuroal.pruning.allocation import expand_to_modules
from neuroal.pruning.allocators.alpha.math import DEFAULT_EPS, alpha_sparsities, block_alpha
from neuroal.pruning.plugin import Allocation, AllocationInputs, Allocator


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    eps: float = Field(DEFAULT_EPS, gt=0, lt=1, description="block sparsities span the target +- eps (before weighting)")


def allocate(inputs: AllocationInputs, options: Options = Options()) -> Allocation:
    """One alpha per block from its weights' spectra, mapped to block sparsities."""
    blocks = matrices_by_block(inputs.model)
    alphas = [block_alpha([m.weight.to(inputs.device) for m in b.values()]) for b in blocks]
    params = [sum(m.weight.numel() for m in b.values()) for b in blocks]
    targets = expand_to_modules(alpha_sparsities(alphas, params, inputs.sparsity, options.eps), [list(b) for b in blocks])
    return Allocation(targets, {"block_alphas": alphas})


ALLOCATOR = Allocator("alpha", "AlphaPruning: heavy-tailed spectra pruned less (Lu et al., NeurIPS 2024)", allocate,
                      Options)
