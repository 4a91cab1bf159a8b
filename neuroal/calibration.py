"""Layer-sequential runner: capture the first decoder block's inputs once, then replay the model
block by block, so each block can be measured and pruned with the inputs that the (already
pruned) blocks before it produce. Only one block needs to sit on the compute device at a time.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

logger = logging.getLogger(__name__)


@dataclass
class BlockInputs:
    """What one decoder block receives for each calibration batch.

    ``hidden`` holds one ``[batch, seqlen, hidden_size]`` tensor per batch on the compute device;
    ``args``/``kwargs`` are the other arguments the model passed to its first block with that batch
    (attention mask, position embeddings, ...), replayed unchanged to every block.
    """

    hidden: list[torch.Tensor]
    args: list[tuple] = field(default_factory=list)
    kwargs: list[dict] = field(default_factory=list)

    @property
    def nsamples(self) -> int:
        return sum(h.shape[0] for h in self.hidden)

    def with_hidden(self, hidden: list[torch.Tensor]) -> "BlockInputs":
        return BlockInputs(hidden=hidden, args=self.args, kwargs=self.kwargs)


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass at the first block."""


class _Observed(Exception):
    """Raised once every linear of a block has seen its input, when the outputs are not wanted."""


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor, device: torch.device, batch_size: int
) -> BlockInputs:
    """Run the model up to its first block on every batch and keep what the block receives."""
    captured = BlockInputs(hidden=[])

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.hidden.append(hidden.detach())
        captured.args.append(tuple(args[1:]))
        captured.kwargs.append(dict(kwargs))
        raise _Captured

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with _onloaded_except(model, blocks, device):
            for start in range(0, input_ids.shape[0], batch_size):
                with contextlib.suppress(_Captured):
                    model(input_ids=input_ids[start : start + batch_size].to(device), use_cache=False)
    finally:
        handle.remove()
    return captured


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs) -> BlockInputs:
    """Feed every batch through one block; its outputs are the next block's inputs."""
    outputs = []
    for hidden, args, kwargs in zip(inputs.hidden, inputs.args, inputs.kwargs):
        out = block(hidden, *args, **kwargs)
        # transformers 5 layers return a Tensor; older or custom ones a tuple (hidden, ...).
        outputs.append(out[0] if isinstance(out, (tuple, list)) else out)
    return inputs.with_hidden(outputs)


@torch.no_grad()
def observe_inputs(
    block: nn.Module, linears: dict[str, nn.Linear], inputs: BlockInputs, observe: Callable[[str, torch.Tensor], None],
    *, outputs: bool = True,
) -> BlockInputs | None:
    """Run the block once, calling ``observe(name, x)`` with every batch of input each linear reads
    (``x``: ``[batch, tokens, in_features]``); returns the block's outputs.

    ``outputs=False``: only the inputs are wanted, so each batch stops as soon as every linear has
    seen its input; the last projection (an MLP's down projection, a quarter of a block's work)
    and the residual are never computed. Returns None.
    """
    seen: set[str] = set()

    def hook(name):
        def observe_input(_module, args):
            observe(name, args[0].detach())
            seen.add(name)
            if not outputs and len(seen) == len(linears):
                raise _Observed
        return observe_input

    handles = [lin.register_forward_pre_hook(hook(name)) for name, lin in linears.items()]
    try:
        if outputs:
            return run_block(block, inputs)
        for hidden, args, kwargs in zip(inputs.hidden, inputs.args, inputs.kwargs):
            seen.clear()
            with contextlib.suppress(_Observed):
                block(hidden, *args, **kwargs)
        return None
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def onloaded(module: nn.Module, device: torch.device):
    """Move ``module`` to ``device`` for the duration of the block, then back where it was."""
    home = next(module.parameters()).device
    if home == device:
        yield module
        return
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)


@contextlib.contextmanager
def _onloaded_except(model: nn.Module, blocks: nn.ModuleList, device: torch.device):
    """Onload everything but the decoder blocks (embeddings, rotary tables, norms) for capture."""
    block_ids = {id(b) for b in blocks}
    moved: list[nn.Module] = []

    def visit(module: nn.Module):
        if id(module) in block_ids:
            return
        tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if any(t.device != device for t in tensors):
            moved.append(module)
        for child in module.children():
            visit(child)

    visit(model)
    homes = [next(iter(list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)))).device for m in moved]
    for m in moved:
        _move_own_tensors(m, device)
    try:
        yield
    finally:
        for m, home in zip(moved, homes):
            _move_own_tensors(m, home)


def _move_own_tensors(module: nn.Module, device: torch.device) -> None:
    """Move a module's own parameters and buffers (not its children's); ties stay shared."""
    for p in module.parameters(recurse=False):
        p.data = p.data.to(device)
    for name, buf in module.named_buffers(recurse=False):
        module._buffers[name] = buf.to(device)
