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
from typing import Literal

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
from neuroal.pruning.walks import WALKS
from neuroal.replay import BlockInputs, capture_block_inputs, onloaded, onloaded_except_blocks, shadowed_forwards

logger = logging.getLogger(__name__)


class Options(BaseModel):
    """ATP's options (``--atp-step``, ``--atp-beta``, ``--atp-strategy``, ``--atp-search-set``).

    The defaults are the authors' search: every legal beta, each scored on every calibration
    window. ``coarse`` and ``search_set`` make it cheaper (5-6 candidates on the search set cost
    about one prune instead of 10-17), at the risk of another beta where the curve is not
    single-minimum or the search set ranks candidates differently.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    step: float = Field(DEFAULT_STEP, gt=0, lt=1, description="grid step of the searched common difference beta")
    beta: float | None = Field(None, ge=0, description="a fixed common difference beta, no search")
    strategy: Literal["grid", "coarse"] = Field("grid", description="every legal beta, or a golden-section walk")
    search_set: bool = Field(False, description="score candidates on the search set (the first --search-nsamples "
                                                "windows) instead of every calibration window")


def allocate(inputs: AllocationInputs, options: Options = Options()) -> Allocation:
    """Block sparsities of paper Eq. 10 with the searched (or given) common difference."""
    blocks = matrices_by_block(inputs.model)
    if options.beta is None:
        beta, details = search_beta(inputs, options)
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


def search_beta(inputs: AllocationInputs, options: Options = Options()) -> tuple[float, dict]:
    """The authors' grid search: the legal multiples of ``options.step``, lowest perplexity on the
    calibration windows (or the search set), every candidate or a golden-section walk.

    Args:
        inputs: the dense model, target, base method, calibration windows and search set.
        options: the grid step, walk and scoring windows.

    Returns:
        ``(beta, details)``; ``details`` holds every scored candidate's perplexity. With no legal
        candidate (one block, or a target of 0) ``beta`` is 0: every block at the target.
    """
    num_blocks = len(decoder_blocks(inputs.model))
    grid = beta_grid(num_blocks, inputs.sparsity, options.step)
    bound = max_beta(num_blocks, inputs.sparsity)
    details = {"step": options.step, "max_beta": bound if isfinite(bound) else None,
               "strategy": options.strategy, "scored_on": "search set" if options.search_set else "calibration"}
    if not grid:
        logger.warning("ATP: no legal beta for %d block(s) at sparsity %s; every block at the target",
                       num_blocks, inputs.sparsity)
        return 0.0, {"searched": False, **details}
    ids = inputs.search_ids if options.search_set else inputs.calibration_ids
    losses = calibration_losses(inputs, grid, ids=ids, strategy=options.strategy)
    beta = best_beta(losses)
    logger.info("ATP: beta %.4g, %d of %d candidates scored (perplexity %.6g)", beta, len(losses), len(grid),
                _perplexity(losses[beta]))
    scores = {str(b): _perplexity(losses[b]) for b in grid if b in losses}
    return beta, {"searched": True, **details, "calibration_perplexity": scores}


@torch.no_grad()
def calibration_losses(inputs: AllocationInputs, betas: list[float], *, ids: torch.Tensor | None = None,
                       strategy: str = "grid") -> dict[float, float]:
    """Mean next-token cross-entropy on ``ids`` (default: the calibration windows) of the model
    pruned with each walked ``beta``'s block sparsities (the model's weights are unchanged after).

    Args:
        inputs: the dense model, target, base method, device, batch size and calibration windows.
        betas: the candidates, each legal for the model's block count and the target.
        ids: the windows scored.
        strategy: ``grid`` (every candidate) or ``coarse`` (``walks.coarse_walk``).

    Returns:
        ``{beta: loss}`` for the candidates scored (perplexity is ``exp(loss)``), in walk order.

    Raises:
        ValueError: without windows.
    """
    ids = inputs.calibration_ids if ids is None else ids
    if ids is None:
        raise ValueError("ATP's search needs calibration windows")
    model, device = inputs.model, inputs.device
    blocks = decoder_blocks(model)
    dense_inputs = capture_block_inputs(model, blocks, ids, device, inputs.batch_size)
    losses, sizes = {}, block_sizes(inputs)
    walk, bar = WALKS[strategy](betas), progress(total=len(betas), desc="atp")
    index = next(walk)
    while True:
        beta = betas[index]
        final = pruned_outputs(blocks, dense_inputs, inputs.method, block_sparsities(sizes, inputs.sparsity, beta), device)
        losses[beta] = head_loss(model, blocks, final, ids, device, inputs.batch_size)
        logger.debug("ATP: beta %.4g, perplexity %.6g", beta, _perplexity(losses[beta]))
        bar.update()
        try:
            index = walk.send(betas.index(best_beta(losses)))
        except StopIteration:
            break
    bar.close()
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
                      allocate, Options, reads_data=True, searches=lambda options: options.search_set,
                      summary=lambda details: {"beta": details["beta"], "searched": details["searched"]})
