"""Base methods and sparsity allocators (plugins listed in ``registry.py``), and the wiring that
applies them block by block (``prune.py``)."""

from neuroal.pruning.allocation import load_allocation, save_allocation
from neuroal.pruning.plugin import Allocation, AllocationInputs, Allocator, BaseMethod
from neuroal.pruning.prune import needs_calibration, prune_model, sparsity_report
from neuroal.pruning.registry import ALLOCATORS, BASE_METHODS, allocator, base_method

__all__ = [
    "ALLOCATORS",
    "BASE_METHODS",
    "Allocation",
    "AllocationInputs",
    "Allocator",
    "BaseMethod",
    "allocator",
    "base_method",
    "load_allocation",
    "needs_calibration",
    "prune_model",
    "save_allocation",
    "sparsity_report",
]
