"""SparseGPT (Frantar & Alistarh, 2023): one-shot pruning by approximate optimal brain surgeon.

Pure functions transcribing the reference ``SparseGPT.add_batch`` / ``SparseGPT.fasterprune``
(IST-DASLab/sparsegpt ``sparsegpt.py``, vendored unchanged apart from the quantizer in
locuslab/wanda ``lib/sparsegpt.py`` and in the NeuroAl authors' ``lib/sparsegpt.py``): the Hessian
``H = 2/n sum X^T X`` of the layer-wise reconstruction loss is accumulated from a module's inputs;
then the columns are visited left to right in blocks, the mask of a block is chosen from
``W^2 / diag(H^-1)^2``, and the error each pruned weight leaves is spread (OBS update) over the
not-yet-visited weights of its row.

Differences from the reference, all where its behaviour is undefined or a crash:

- the caller's Hessian is left untouched (the reference edits and then deletes it);
- if a Cholesky factorisation fails, the damping is raised tenfold and the factorisation retried
  (the reference crashes);
- within an N:M group, ties go to the lower column (stable sort) instead of ``torch.topk``'s
  unspecified order;
- ``sparsity <= 0`` prunes nothing (the reference's threshold would still prune the lowest weight
  of every block) and ``sparsity >= 1`` prunes everything (the reference indexes out of range).
"""

from __future__ import annotations

import logging
import time

import torch

from neuroal.errors import UserError
from neuroal.pruning.masks import check_nm, nm_mask
from neuroal.pruning.plugin import BaseMethod, Structure, Target
from neuroal.pruning.statistics import HESSIAN, InputStats

logger = logging.getLogger(__name__)

BLOCKSIZE = 128  # the reference's default: columns handled per lazy batch of OBS updates
PERCDAMP = 0.01  # the reference's default: damping = 1% of the mean Hessian diagonal
_RETRY_GROWTH = 10.0  # each retry multiplies the damping by 10, to cross orders of magnitude quickly
_RETRIES = 6  # after 6 retries the damping is 10^4 x mean diag: H is then diagonal-dominant


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    prune_n: int = 0,
    prune_m: int = 0,
    blocksize: int = BLOCKSIZE,
    percdamp: float = PERCDAMP,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight`` with SparseGPT and update its kept weights to compensate.

    Steps, as the reference ``fasterprune``: columns that never saw input (``diag H == 0``) get
    ``H_jj = 1`` and their weights zeroed; ``H`` is damped by ``percdamp * mean(diag H)``; the upper
    Cholesky factor of ``H^-1`` is computed. Then, per block of ``blocksize`` columns:

    - unstructured: prune the weights with ``W^2 / diag(Hinv)^2 <= t``, where ``t`` is the value at
      index ``int(numel * sparsity)`` of the block's sorted scores (so ``int(numel * s) + 1``
      weights per block when there are no ties, as the reference);
    - N:M (``prune_n > 0``): when reaching the first column of each group of ``prune_m`` columns,
      prune the ``prune_n`` lowest ``W^2 / diag(Hinv)^2`` of the group (scores of the current,
      already updated weights); ``sparsity`` is then ignored;

    and visit the block's columns one by one, zeroing the pruned weights and spreading the error
    over the remaining columns of the block; after the block, over all later columns.

    If a Cholesky factorisation fails (``H`` not numerically positive definite), the damping is
    multiplied by 10 and the factorisation retried, up to 6 times, with a warning each time.

    Args:
        weight: ``[out, in]``, any float dtype and device; not modified.
        hessian: ``[in, in]``, from :func:`add_to_hessian`; not modified.
        sparsity: fraction of each block's weights to prune (unstructured).
        prune_n: N of N:M; 0 for unstructured.
        prune_m: M of N:M.
        blocksize: columns per block (a multiple of ``prune_m`` for N:M).
        percdamp: damping, as a fraction of the mean Hessian diagonal.

    Returns:
        ``(new_weight, mask)``: the updated weight (dtype and device of ``weight``; exactly 0 where
        pruned, and also at dead columns) and the bool prune mask (True = pruned).

    Raises:
        UserError: on an invalid N:M structure for this weight.
        ValueError: when the Hessian's shape does not match the weight.
        RuntimeError: when no damping makes the Hessian factorisable (non-finite inputs).
    """
    rows, columns = weight.shape
    if tuple(hessian.shape) != (columns, columns):
        raise ValueError(f"hessian shape {tuple(hessian.shape)} does not match weight columns {columns}")
    if prune_n:
        check_nm(prune_n, prune_m, columns)
        if blocksize % prune_m:
            raise UserError(f"sparsegpt block size {blocksize} must be a multiple of M={prune_m}")
    tick = time.perf_counter()
    device = weight.device
    W = weight.detach().to(torch.float32, copy=True)
    H = hessian.detach().to(device=device, dtype=torch.float32, copy=True)

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    Hinv = _inverse_hessian_factor(H, percdamp)

    mask = torch.zeros((rows, columns), dtype=torch.bool, device=device)
    losses = torch.zeros(rows, device=device)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        hinv_diag = torch.diag(Hinv1)

        if prune_n == 0:
            mask1 = _block_mask(W1 ** 2 / hinv_diag.reshape((1, -1)) ** 2, sparsity)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)

        for i in range(i2 - i1):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prune_n != 0 and i % prune_m == 0:
                group = W1[:, i : i + prune_m] ** 2 / hinv_diag[i : i + prune_m].reshape((1, -1)) ** 2
                mask1[:, i : i + prune_m] = nm_mask(group, prune_n, prune_m)
            q = w.masked_fill(mask1[:, i], 0)
            Q1[:, i] = q
            Losses1[:, i] = (w - q) ** 2 / d ** 2
            err1 = (w - q) / d
            W1[:, i:] -= torch.outer(err1, Hinv1[i, i:])
            Err1[:, i] = err1

        W[:, i1:i2] = Q1
        mask[:, i1:i2] = mask1
        losses += torch.sum(Losses1, 1) / 2
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])

    logger.debug(
        "sparsegpt %dx%d: %.2f s, OBS error %.4g", rows, columns, time.perf_counter() - tick, losses.sum().item()
    )
    return W.to(weight.dtype), mask


def _block_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The reference's block threshold: prune scores ``<=`` the ``int(numel * sparsity)``-th smallest."""
    if sparsity <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    index = min(int(scores.numel() * sparsity), scores.numel() - 1)  # s >= 1: prune all, not IndexError
    thresh = torch.sort(scores.flatten())[0][index]
    return scores <= thresh


def _inverse_hessian_factor(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp I)^-1``, raising ``damp`` until the factorisations succeed."""
    diag = torch.arange(H.shape[0], device=H.device)
    scale = torch.mean(torch.diag(H))
    # retries start from at least the reference's 1%, so that percdamp=0 can still grow
    fractions = [percdamp] + [max(percdamp, PERCDAMP) * _RETRY_GROWTH**k for k in range(1, _RETRIES + 1)]
    for attempt, fraction in enumerate(fractions):
        damped = H.clone()
        damped[diag, diag] += fraction * scale
        lower, info = torch.linalg.cholesky_ex(damped)
        if info.item() == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if info.item() == 0 and bool(torch.isfinite(upper).all()):
                if attempt:
                    logger.warning("sparsegpt: Hessian factorised with damping %.3g x mean diagonal", fraction)
                return upper
        logger.warning("sparsegpt: Cholesky failed with damping %.3g x mean diagonal; retrying", fraction)
    raise RuntimeError("sparsegpt: the Hessian cannot be factorised at any damping; are the inputs finite?")


def _prune(weight: torch.Tensor, stats: InputStats, target: Target, structure: Structure):
    if isinstance(target, torch.Tensor):
        raise UserError("sparsegpt takes one sparsity per module, not per-row sparsities")
    n, m = structure or (0, 0)
    return sparsegpt_prune(weight, stats.hessian, target, prune_n=n, prune_m=m)


METHOD = BaseMethod("sparsegpt", "optimal brain surgeon per row, updating the weights it keeps", frozenset((HESSIAN,)),
                    _prune)
