"""Perplexity: mean next-token loss over non-overlapping windows of a corpus's test split."""

from __future__ import annotations

import math

import torch
from torch import nn

from neuroal.data import load_text, window_bos_id
from neuroal.progress import progress


def eval_windows(tokenizer, corpus: str, seqlen: int, limit: int | None = None, *,
                 bos_per_window: bool = False) -> torch.Tensor:
    """The test split tokenized as one text and cut into ``[windows, seqlen]`` (the tail is dropped).

    Without ``bos_per_window`` this is the reference's ``eval_ppl``: the text tokenized as usual
    (special tokens as the tokenizer adds them), cut every ``seqlen`` tokens. With it, the text is
    tokenized without special tokens, cut every ``seqlen - 1`` tokens, and each piece gets the
    tokenizer's BOS in front, so every window is ``seqlen`` tokens that start the way the model
    expects (see ``neuroal.data.windows``).

    Args:
        tokenizer: The model's tokenizer.
        corpus: A corpus name or user corpus path; its test split is read.
        seqlen: Tokens per window, BOS included.
        limit: At most this many windows (None: all).
        bos_per_window: Put BOS at the start of every window (resolved, not ``auto``).

    Returns:
        ``[windows, seqlen]`` int64 token ids.
    """
    text = load_text(corpus, "test")
    if not bos_per_window:
        ids = tokenizer(text, return_tensors="pt").input_ids[0]
        return _cut(ids, seqlen, limit)
    bos = window_bos_id(tokenizer)
    body = _cut(tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0], seqlen - 1, limit)
    return torch.cat([torch.full((body.shape[0], 1), bos, dtype=body.dtype), body], dim=1)


def _cut(ids: torch.Tensor, length: int, limit: int | None) -> torch.Tensor:
    """Consecutive ``length``-token rows of ``ids``, at most ``limit`` of them."""
    count = ids.numel() // length
    if limit is not None:
        count = min(count, limit)
    return ids[: count * length].reshape(count, length)


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, device: torch.device, batch_size: int = 8) -> float:
    """``exp`` of the mean next-token cross-entropy over all windows (each window scored alone).

    Every position but the first predicts the next token, so ``seqlen - 1`` tokens per window are
    scored. For a window that starts with a BOS of its own (``eval_windows(bos_per_window=True)``)
    the BOS is never a target: it is the context of the first corpus token, which is scored, so
    the scored tokens are exactly the window's ``seqlen - 1`` corpus tokens.
    """
    total, count = 0.0, 0
    batch_size = min(batch_size, rows_within_logits_budget(windows.shape[1], model.config.get_text_config().vocab_size))
    for start in progress(range(0, windows.shape[0], batch_size), desc="perplexity"):
        loss, scored = next_token_loss(model, windows[start : start + batch_size].to(device))
        total, count = total + loss, count + scored
    return math.exp(total / count)


@torch.no_grad()
def next_token_loss(model: nn.Module, batch: torch.Tensor) -> tuple[float, int]:
    """Summed next-token cross-entropy of one forward over ``[rows, seqlen]`` windows, and the
    number of tokens scored (every position but the first)."""
    logits = model(input_ids=batch, use_cache=False).logits.float()
    loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                       reduction="sum")
    return loss.item(), batch[:, 1:].numel()


# A forward's float32 logits are [rows, seqlen, vocab], and about three such tensors are alive at
# once (the model's, cross-entropy's log-softmax, its gradient-free copy). Capping one at 4 GiB
# keeps 8 rows of 2048 tokens for vocabularies up to 64k (SmolLM2: 49k, so its numbers do not
# move) and scores Gemma 3 (262k) and Qwen2.5 (152k), whose 8 x 2048 logits alone took 16 and
# 9 GiB and were killed for memory on 24 GiB.
_LOGITS_BUDGET = 4 << 30


def rows_within_logits_budget(seqlen: int, vocab_size: int) -> int:
    """How many windows one forward may score so that their float32 logits fit the budget (>= 1)."""
    return max(1, _LOGITS_BUDGET // (seqlen * vocab_size * 4))
