"""Uniform: every prunable module at the target sparsity, the allocation of the base methods'
papers."""

from __future__ import annotations

from neuroal.pruning.plugin import Allocation, AllocationInputs, Allocator, NoOptions


def allocate(inputs: AllocationInputs, _options: NoOptions = NoOptions()) -> Allocation:
    """Every prunable module at the target."""
    return Allocation({name: inputs.sparsity for name in inputs.matrices})


ALLOCATOR = Allocator("uniform", "every module at the target sparsity", allocate, keeps_structure=True)
