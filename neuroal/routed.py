"""The inputs each expert of a fused experts module reads, taken from the model's own routing.

A hook on the experts module receives what transformers passes it (the hidden states, the chosen
experts of every token and their weights); the tokens routed to expert e are its gate/up input,
and its down projection reads ``gate(x W_gate_up[e]^T + b)``, computed with the module's own
gating function. Routing itself is never recomputed.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from neuroal.models.matrices import Matrix


@dataclass(frozen=True)
class Routed:
    """The tokens of one batch that reach one expert.

    Attributes:
        x: ``[tokens, in]``, the rows the expert's matrix reads.
        sample: ``[tokens]``, the calibration sample (row of the batch) each token comes from.
        samples: The samples in the batch, routed to this expert or not: statistics average over
            samples, as they do for a dense module.
    """

    x: torch.Tensor
    sample: torch.Tensor
    samples: int


def routed_inputs(experts: nn.Module, args: tuple, kwargs: dict, samples: int,
                  matrices: dict[str, Matrix]) -> Iterator[tuple[str, Routed]]:
    """``(name, inputs)`` for each of ``matrices`` (named slices of this experts module), from one
    call of the module; an expert that no token reaches gets zero rows."""
    call = inspect.signature(experts.forward).bind(*args, **kwargs).arguments
    hidden, chosen = list(call.values())[:2]  # (hidden_states, top_k_index, top_k_weights)
    hidden = hidden.detach().reshape(-1, hidden.shape[-1])
    chosen = chosen.reshape(hidden.shape[0], -1)
    tokens_per_sample = hidden.shape[0] // samples
    names: dict[int, dict[str, str]] = {}  # expert -> tensor -> slice name
    for name, matrix in matrices.items():
        names.setdefault(matrix.expert, {})[matrix.param] = name
    first = "gate_up_proj" if experts.has_gate else "up_proj"
    for expert, pair in sorted(names.items()):
        tokens = (chosen == expert).any(dim=1).nonzero().squeeze(1)
        sample = tokens // tokens_per_sample
        x = hidden[tokens]
        if first in pair:
            yield pair[first], Routed(x, sample, samples)
        if "down_proj" in pair:
            up = Matrix(experts, first, first, expert)
            projected = nn.functional.linear(x, up.weight, up.bias)
            gated = experts._apply_gate(projected) if experts.has_gate else experts.act_fn(projected)
            yield pair["down_proj"], Routed(gated, sample, samples)
