"""The prunable weight matrices of a decoder block: every ``nn.Linear``, and every expert's slice of
a fused 3-D expert tensor (transformers 5 keeps a mixture-of-experts layer's experts as
``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``, or transposed). Routers and shared-expert
gates stay dense; any other weight of two or more dimensions is refused, never skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from neuroal.errors import UserError


@dataclass(frozen=True, eq=False)
class Matrix:
    """One ``[out, in]`` weight matrix that the pruner scores and masks.

    Attributes:
        owner: The ``nn.Linear``, or the fused experts module.
        stem: The name the architecture table lists it under, relative to the block: the linear's
            module name, or the fused tensor's (``mlp.experts.gate_up_proj``) for an expert slice.
        param: The owner's parameter that holds it.
        expert: The expert's index in the fused tensor; None for a linear.
    """

    owner: nn.Module
    stem: str
    param: str = "weight"
    expert: int | None = None

    @property
    def weight(self) -> torch.Tensor:
        """The matrix as ``[out, in]``: a view, so in-place edits write the model's parameter."""
        tensor = getattr(self.owner, self.param)
        if self.expert is None:
            return tensor
        tensor = tensor[self.expert]
        return tensor.t() if self.owner.is_transposed else tensor

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def bias(self) -> torch.Tensor | None:
        """The bias of these output rows, or None."""
        if self.expert is None:
            return self.owner.bias
        return getattr(self.owner, f"{self.param}_bias")[self.expert] if self.owner.has_bias else None


def fused_experts_tensors(module: nn.Module) -> tuple[str, str] | None:
    """``(input tensor, output tensor)`` names when ``module`` holds fused experts the way
    transformers' ``use_experts_implementation`` describes them (``is_transposed``, ``has_gate``,
    ``has_bias``), else None. The input tensor is ``gate_up_proj``, or ``up_proj`` without a gate."""
    if not hasattr(module, "is_transposed") or not hasattr(module, "has_gate"):
        return None
    first = "gate_up_proj" if module.has_gate else "up_proj"
    tensors = [getattr(module, name, None) for name in (first, "down_proj")]
    if all(isinstance(t, nn.Parameter) and t.dim() == 3 for t in tensors):
        return first, "down_proj"
    return None


def block_matrices(block: nn.Module) -> dict[str, Matrix]:
    """Every prunable matrix of one decoder block by name relative to the block, in module order;
    an expert slice is named ``<experts>.<tensor>.<expert>`` (``mlp.experts.down_proj.3``).

    Raises ``UserError`` naming the first weight of two or more dimensions that is neither a
    linear's, an expert tensor, nor a router's."""
    matrices: dict[str, Matrix] = {}
    covered: set[str] = set()
    routing = _routing_modules(block)
    for name, module in block.named_modules():
        tensors = fused_experts_tensors(module)
        if tensors is not None:
            count = getattr(module, tensors[0]).shape[0]
            for tensor in tensors:
                stem = f"{name}.{tensor}"
                matrices.update({f"{stem}.{e}": Matrix(module, stem, tensor, e) for e in range(count)})
                covered.update((stem, f"{stem}_bias"))
        elif name in routing:
            covered.update(f"{name}.{p}" for p, _ in module.named_parameters(recurse=False))
        elif isinstance(module, nn.Linear):
            matrices[name] = Matrix(module, name)
            covered.add(f"{name}.weight")
    for name, parameter in block.named_parameters():
        if parameter.dim() >= 2 and name not in covered:
            raise UserError(f"cannot prune the weight {name} {tuple(parameter.shape)} of {type(block).__name__}: "
                            "neither a linear layer's nor a fused expert tensor's; the model is refused")
    return matrices


def _routing_modules(block: nn.Module) -> set[str]:
    """Names of the modules that route tokens and stay dense: the siblings of a fused experts module
    that hold weights themselves (``gate``, ``router``, Qwen2-MoE's ``shared_expert_gate``). A
    sibling that only contains modules (a shared expert) is an ordinary MLP."""
    routing = set()
    for parent_name, parent in block.named_modules():
        children = dict(parent.named_children())
        if not any(fused_experts_tensors(child) for child in children.values()):
            continue
        for child_name, child in children.items():
            if fused_experts_tensors(child) is None and any(True for _ in child.parameters(recurse=False)):
                routing.add(f"{parent_name}.{child_name}" if parent_name else child_name)
    return routing
