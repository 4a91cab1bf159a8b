"""ATP as an allocator: block sparsities rise with depth in an arithmetic progression around the
target, its common difference ``beta`` chosen by the authors' grid search. Each candidate prunes
the model layer-sequentially with the base method, as the final prune will, and is scored by the
perplexity of the pruned model on the calibration windows (the authors score on WikiText-2's
test split; an allocator sees only the calibration data). The math is in ``math.py``.

Per candidate, one pass: block 0's inputs are captured once for the whole search; each block is
measured, then tried pruned (``prune.trial_block``, the trial step NeuroAl's search uses too), so
the model is left as it was and only one block's copy is held. The model's head then scores the
last block's outputs.
"""

from __future__ import annotations

import logging
from math import exp, isfinite  # not `import math`: the package's own `math` module shadows it

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from neuroal.errors import UserError
from neuroal.evaluation.perplexity import next_token_loss, rows_within_logits_budget
from neuroal.models import block_matrices, decoder_blocks, matrices_by_block
from neuroal.progress import progress
from neuroal.pruning.allocation import at_target_by_weight, expand_to_modules
from neuroal.pruning.allocators.atp.math import DEFAULT_STEP, atp_sparsities, best_beta, beta_grid, max_beta
from neuroal.pruning.layer_sequential import input_stats
from neuroal.pruning.plugin import Allocation, AllocationInputs, Allocator, BaseMethod
from neuroal.pruning.prune import pruned_weight, trial_block
from neuroal.replay import BlockInputs, capture_block_inputs, onloaded, onloaded_except_blocks, shadowed_forwards

logger = logging.getLogger(__name__)


class Options(BaseModel):
    """ATP's options (``--atp-step``, ``--atp-beta``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    step: float = Field(DEFAULT_STEP, gt=0, lt=1, description="grid step of the searched common difference beta")
    beta: float | None = Field(None, ge=0, description="a fixed common difference beta, no search")


def allocate(inputs: AllocationInputs, options: Options = Options()) -> Allocation:
    """Block sparsities of paper Eq. 10 with the searched (or given) common difference."""
    blocks = matrices_by_block(inputs.model)
    if options.beta is None:
        beta, details = search_beta(inputs, options.step)
    else:
        beta, details = options.beta, {"searched": False}
    try:
        sparsities = block_sparsities(block_sizes(inputs), inputs.sparsity, beta)
    except ValueError as exc:  # only a given beta can be illegal: the grid holds legal ones
        raise UserError(f"--atp-beta: {exc}") from None
    details = {"beta": beta, **details, "block_sparsities": sparsities}
    return Allocation(expand_to_modules(sparsities, [list(b) for b in blocks]), details)


def block_sizes(inputs: AllocationInputs) -> list[int]:
    """Weights per decoder block, experts included."""
    return [sum(m.weight.numel() for m in b.values()) for b in matrices_by_block(inputs.model)]


def block_sparsities(sizes: list[int], sparsity: float, beta: float) -> list[float]:
    """Paper Eq. 10 for ``beta``, balanced by the blocks' weight counts (``at_target_by_weight``)."""
    return at_target_by_weight(atp_sparsities(len(sizes), sparsity, beta), sizes, sparsity)


def search_beta(inputs: AllocationInputs, step: float = DEFAULT_STEP) -> tuple[float, dict]:
    """The authors' grid search: the legal multiples of ``step``, lowest calibration perplexity.

    Args:
        inputs: the dense model, target, base method and calibration windows.
        step: the grid step.

    Returns:
        ``(beta, details)``; ``details`` holds every candidate's perplexity. With no legal
        candidate (one block, or a target of 0) ``beta`` is 0: every block at the target.
    """
    num_blocks = len(decoder_blocks(inputs.model))
    grid = beta_grid(num_blocks, inputs.sparsity, step)
    bound = max_beta(num_blocks, inputs.sparsity)
    details = {"step": step, "max_beta": bound if isfinite(bound) else None}
    if not grid:
        logger.warning("ATP: no legal beta for %d block(s) at sparsity %s; every block at the target",
                       num_blocks, inputs.sparsity)
        return 0.0, {"searched": False, **details}
    losses = calibration_losses(inputs, grid)
    beta = best_beta(losses)
    logger.info("ATP: beta %.4g of %d candidates (calibration perplexity %.6g)", beta, len(grid),
                _perplexity(losses[beta]))
    scores = {str(b): _perplexity(loss) for b, loss in losses.items()}
    return beta, {"searched": True, **details, "calibration_perplexity": scores}


@torch.no_grad()
def calibration_losses(inputs: AllocationInputs, betas: list[float]) -> dict[float, float]:
    """Mean next-token cross-entropy on the calibration windows of the model pruned with each
    ``beta``'s block sparsities (the model's weights are unchanged afterwards).

    Args:
        inputs: the dense model, target, base method, device, batch size and calibration windows.
        betas: the candidates, each legal for the model's block count and the target.

    Returns:
        ``{beta: loss}`` (perplexity is ``exp(loss)``), in the order of ``betas``.

    Raises:
        ValueError: without calibration windows.
    """
    if inputs.calibration_ids is None:
        raise ValueError("ATP's search needs calibration windows")
    model, ids, device = inputs.model, inputs.calibration_ids, inputs.device
    blocks = decoder_blocks(model)
    dense_inputs = capture_block_inputs(model, blocks, ids, device, inputs.batch_size)
    losses, sizes = {}, block_sizes(inputs)
    for beta in progress(betas, desc="atp"):
        sparsities = block_sparsities(sizes, inputs.sparsity, beta)
        final = pruned_outputs(blocks, dense_inputs, inputs.method, sparsities, device)
        losses[beta] = head_loss(model, blocks, final, ids, device, inputs.batch_size)
        logger.debug("ATP: beta %.4g, calibration perplexity %.6g", beta, _perplexity(losses[beta]))
    return losses


def pruned_outputs(blocks: nn.ModuleList, inputs: BlockInputs, method: BaseMethod, sparsities: list[float],
                   device: torch.device) -> list[torch.Tensor]:
    """The last block's outputs when every block is pruned layer-sequentially at its sparsity, as
    ``prune_model`` does; each block gets its dense weights back once its outputs are computed.

    Args:
        blocks: the decoder blocks.
        inputs: block 0's inputs (``capture_block_inputs``).
        method: the base method.
        sparsities: one per block.
        device: where blocks are computed.

    Returns:
        The last block's hidden states, one tensor per calibration batch.
    """
    for block, sparsity in zip(blocks, sparsities):
        with onloaded(block, device):
            matrices = block_matrices(block)
            stats = input_stats(block, matrices, inputs, method.statistics) if method.statistics else {}
            inputs = trial_block(block, matrices, inputs,
                                 lambda name, m: pruned_weight(m.weight, method, stats.get(name), sparsity)[:2])
    return inputs.hidden


@torch.no_grad()
def head_loss(model: nn.Module, blocks: nn.ModuleList, final: list[torch.Tensor], ids: torch.Tensor,
              device: torch.device, batch_size: int) -> float:
    """Mean next-token cross-entropy of the model whose last block outputs ``final``.

    The model runs its own forward (embeddings, masks, final norm, head, softcapping) with every
    block shadowed: the last returns the given hidden states, the others pass theirs through.
    Scored as ``evaluation.perplexity`` scores: every position but the first, each window alone.

    Args:
        model: the model.
        blocks: its decoder blocks.
        final: the last block's hidden states, one tensor per batch of ``batch_size`` windows.
        ids: the ``[windows, seqlen]`` tokens they come from.
        device: where the non-block modules run.
        batch_size: windows per tensor of ``final``.

    Returns:
        The mean loss in nats per scored token.
    """
    rows = min(batch_size, rows_within_logits_budget(ids.shape[1], model.config.get_text_config().vocab_size))
    pieces = iter([piece for hidden in final for piece in hidden.split(rows)])
    last = len(blocks) - 1

    def shadow(index: int):
        def forward(*args, **kwargs):
            return next(pieces) if index == last else (args[0] if args else kwargs["hidden_states"])
        return forward

    total, count = 0.0, 0
    with shadowed_forwards(blocks, shadow), onloaded_except_blocks(model, blocks, device):
        for batch in ids.split(batch_size):
            for chunk in batch.split(rows):
                loss, scored = next_token_loss(model, chunk.to(device))
                total, count = total + loss, count + scored
    return total / count


def _perplexity(loss: float) -> float | None:
    """``exp(loss)`` for the record; None where it is not a finite number (a NaN loss, or one past
    float64's exp range at about 709 nats)."""
    try:
        value = exp(loss)
    except OverflowError:
        return None
    return value if isfinite(value) else None


ALLOCATOR = Allocator("atp", "block sparsities rising in an arithmetic progression (ATP, Huang et al., ICML 2025)",
                      allocate, Options, reads_data=True)
