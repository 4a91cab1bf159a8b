"""Scores, masks, base methods, sparsity allocators and the wiring that applies them."""

from neuroal.pruning.allocators import AllocationContext, load_allocation, save_allocation
from neuroal.pruning.methods import BASE_METHODS, base_method
from neuroal.pruning.topups import TOP_UPS, needs_calibration, top_up
from neuroal.pruning.prune import prune_model, sparsity_report

__all__ = [
    "BASE_METHODS",
    "TOP_UPS",
    "AllocationContext",
    "base_method",
    "load_allocation",
    "needs_calibration",
    "prune_model",
    "save_allocation",
    "sparsity_report",
    "top_up",
]
