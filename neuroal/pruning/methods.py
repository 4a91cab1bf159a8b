"""Registries of base methods (how to score weights) and top-ups (how much to prune where).

Names listed in ``*_PLANNED`` are part of the CLI contract but not built yet; asking for one is a
user error with a clear message, never a silent fallback.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from neuroal.errors import UserError
from neuroal.pruning import allocators, scores


@dataclass(frozen=True)
class BaseMethod:
    """A scoring rule. ``needs_activations``: it reads the per-column input norms of each module."""

    name: str
    needs_activations: bool
    score: Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


BASE_METHODS = {
    "magnitude": BaseMethod("magnitude", False, lambda w, a: scores.magnitude_score(w)),
    "wanda": BaseMethod("wanda", True, scores.wanda_score),
}
BASE_METHODS_PLANNED = ("multiflow", "sparsegpt")

TOP_UPS = {"uniform": allocators.uniform}
TOP_UPS_PLANNED = ("owl", "alpha", "dsnot", "neuroal")


def base_method(name: str) -> BaseMethod:
    """Look up a base method by name."""
    return _lookup("method", name, BASE_METHODS, BASE_METHODS_PLANNED)


def top_up(name: str):
    """Look up a top-up allocator by name."""
    return _lookup("top-up", name, TOP_UPS, TOP_UPS_PLANNED)


def _lookup(kind: str, name: str, built: dict, planned: tuple):
    if name in built:
        return built[name]
    if name in planned:
        raise UserError(f"{kind} {name} is not built yet; available now: {', '.join(built)}")
    raise UserError(f"unknown {kind} {name!r}; choose from {', '.join([*built, *planned])}")
