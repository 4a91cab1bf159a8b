"""Layer-sequential runner: capture what the model gives each decoder block once, then replay the
model block by block, so each block can be measured and pruned with the inputs that the (already
pruned) blocks before it produce. Only one block needs to sit on the compute device at a time.

Blocks of one model need not receive the same arguments: models with sliding-window and global
layers (Gemma 2/3, Cohere2, GPT-OSS, Qwen with ``max_window_layers``, ...) build one attention mask
and, in Gemma 3, one rotary embedding per layer type, and pass each block those of its own type.
So the arguments are recorded per block, from one forward pass in which every block is a recorder.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from neuroal.models.matrices import Matrix
from neuroal.routed import Routed, routed_inputs

logger = logging.getLogger(__name__)

Observed = torch.Tensor | Routed  # what observe_inputs passes on: a linear's batch, or an expert's tokens
Call = tuple[tuple, dict]  # the positional (after the hidden states) and keyword arguments of one block call


@dataclass
class BlockInputs:
    """What decoder block ``index`` receives for each calibration batch.

    ``hidden`` holds one ``[batch, seqlen, hidden_size]`` tensor per batch on the compute device.
    ``calls[b][i]`` are the other arguments (attention mask, position embeddings, ...) that the
    model itself passed to block ``b`` with batch ``i``; they do not depend on the hidden states,
    so they are replayed unchanged however the blocks before were pruned. ``block_ids`` are the
    ``id()`` of the blocks, so that replaying a block out of order fails instead of feeding it
    another block's arguments.
    """

    hidden: list[torch.Tensor]
    calls: list[list[Call]]
    block_ids: list[int]
    index: int = 0

    @property
    def nsamples(self) -> int:
        return sum(h.shape[0] for h in self.hidden)

    def batches(self, block: nn.Module) -> Iterator[tuple[torch.Tensor, tuple, dict]]:
        """``(hidden, args, kwargs)`` per batch for ``block``, which must be block ``index``."""
        if id(block) != self.block_ids[self.index]:
            raise RuntimeError(f"replay out of order: these are the inputs of block {self.index}")
        for hidden, (args, kwargs) in zip(self.hidden, self.calls[self.index]):
            yield hidden, args, kwargs

    def next_block(self, hidden: list[torch.Tensor]) -> "BlockInputs":
        """The next block's inputs: ``hidden`` (this block's outputs) with that block's arguments."""
        return BlockInputs(hidden=hidden, calls=self.calls, block_ids=self.block_ids, index=self.index + 1)


class _Captured(Exception):
    """Raised by the last block's recorder to stop the forward pass before the model's head."""


class _Observed(Exception):
    """Raised once every linear of a block has seen its input, when the outputs are not wanted."""


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor, device: torch.device, batch_size: int
) -> BlockInputs:
    """Run the model on every batch with each block replaced by a recorder that keeps what the
    model passes it and returns its hidden states unchanged; no block computes anything.

    Returns block 0's hidden states and every block's own arguments.
    """
    hidden: list[torch.Tensor] = []
    calls: list[list[Call]] = [[] for _ in blocks]

    def recorder(index: int):
        def forward(*args, **kwargs):
            states = args[0] if args else kwargs.pop("hidden_states")
            if index == 0:
                hidden.append(states.detach())
            calls[index].append((tuple(args[1:]), dict(kwargs)))
            if index == len(blocks) - 1:
                raise _Captured
            return states
        return forward

    with shadowed_forwards(blocks, recorder), onloaded_except_blocks(model, blocks, device):
        for start in range(0, input_ids.shape[0], batch_size):
            with contextlib.suppress(_Captured):
                model(input_ids=input_ids[start : start + batch_size].to(device), use_cache=False)
    for index, block_calls in enumerate(calls):
        if len(block_calls) != len(hidden):
            raise RuntimeError(f"{type(model).__name__} did not call decoder block {index} on every batch")
    return BlockInputs(hidden=hidden, calls=calls, block_ids=[id(b) for b in blocks])


@contextlib.contextmanager
def shadowed_forwards(blocks: nn.ModuleList, forward_of: Callable[[int], Callable]):
    """Shadow each block's ``forward`` with ``forward_of(index)`` (a recorder, a stand-in); an
    instance attribute wins over the class method and keeps the block's own attributes
    (``attention_type``, ...) visible."""
    saved = [block.__dict__.get("forward") for block in blocks]  # accelerate hooks patch forward too
    for index, block in enumerate(blocks):
        block.forward = forward_of(index)
    try:
        yield
    finally:
        for block, forward in zip(blocks, saved):
            if forward is None:
                del block.forward
            else:
                block.forward = forward


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs) -> BlockInputs:
    """Feed every batch through one block; its outputs are the next block's inputs."""
    return inputs.next_block([_block_output(block(hidden, *args, **kwargs)) for hidden, args, kwargs in inputs.batches(block)])


def _block_output(out) -> torch.Tensor:
    # transformers 5 layers return a Tensor; older or custom ones a tuple (hidden, ...).
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def observe_inputs(
    block: nn.Module, matrices: dict[str, Matrix], inputs: BlockInputs, observe: Callable[[str, Observed], None],
    *, outputs: bool = True,
) -> BlockInputs | None:
    """Run the block once, calling ``observe(name, x)`` with every batch of input each matrix
    reads (a linear's ``x``: ``[batch, tokens, in]``; an expert's: the ``Routed`` tokens that reach
    it); returns the block's outputs.

    ``outputs=False``: only the inputs are wanted, so each batch stops as soon as every matrix has
    seen its input; the last projection (an MLP's down projection, a quarter of a block's work)
    and the residual are never computed. Returns None.
    """
    seen: set[str] = set()
    batch = [0]  # samples in the batch being run

    def seen_all(names):
        seen.update(names)
        if not outputs and len(seen) == len(matrices):
            raise _Observed

    def linear_hook(name):
        def observe_input(_module, args):
            # Some families flatten tokens before the MLP (OPT, Qwen2-MoE's shared expert:
            # [batch * tokens, in]); unflatten so that statistics count samples, not batches.
            observe(name, args[0].detach().reshape(batch[0], -1, args[0].shape[-1]))
            seen_all((name,))
        return observe_input

    def experts_hook(slices):
        def observe_routed(module, args, kwargs):
            for name, routed in routed_inputs(module, args, kwargs, batch[0], slices):
                observe(name, routed)
            seen_all(slices)
        return observe_routed

    handles = [m.owner.register_forward_pre_hook(linear_hook(name)) for name, m in matrices.items() if m.expert is None]
    for owner, slices in _slices_by_owner(matrices).items():
        handles.append(owner.register_forward_pre_hook(experts_hook(slices), with_kwargs=True))
    try:
        outputs_by_batch = []
        for hidden, args, kwargs in inputs.batches(block):
            seen.clear()
            batch[0] = hidden.shape[0]
            with contextlib.suppress(_Observed):
                outputs_by_batch.append(_block_output(block(hidden, *args, **kwargs)))
        return inputs.next_block(outputs_by_batch) if outputs else None
    finally:
        for h in handles:
            h.remove()


def _slices_by_owner(matrices: dict[str, Matrix]) -> dict[nn.Module, dict[str, Matrix]]:
    """The expert slices among ``matrices``, grouped by their fused experts module."""
    grouped: dict[nn.Module, dict[str, Matrix]] = {}
    for name, m in matrices.items():
        if m.expert is not None:
            grouped.setdefault(m.owner, {})[name] = m
    return grouped


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
def onloaded_except_blocks(model: nn.Module, blocks: nn.ModuleList, device: torch.device):
    """Onload everything but the decoder blocks (embeddings, rotary tables, norms, head) while the
    model runs with its blocks shadowed."""
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
