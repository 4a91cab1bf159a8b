"""Sparsity allocators (top-ups): decide how much of each module to prune. Any base method
consumes the result. An allocation maps a module's full name to one sparsity, or to a tensor of
per-row sparsities."""

from __future__ import annotations

from typing import Union

import torch
from torch import nn

Allocation = dict[str, Union[float, torch.Tensor]]


def uniform(linears: dict[str, nn.Linear], sparsity: float) -> Allocation:
    """Every prunable module at the target sparsity."""
    return {name: sparsity for name in linears}
