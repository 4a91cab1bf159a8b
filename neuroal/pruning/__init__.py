"""Scores, masks, base methods, sparsity allocators and the wiring that applies them."""

from neuroal.pruning.methods import BASE_METHODS, TOP_UPS, base_method, top_up
from neuroal.pruning.prune import prune_model, sparsity_report

__all__ = ["BASE_METHODS", "TOP_UPS", "base_method", "prune_model", "sparsity_report", "top_up"]
