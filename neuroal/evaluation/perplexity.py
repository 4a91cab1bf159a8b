"""Perplexity: mean next-token loss over non-overlapping windows of a corpus's test split."""

from __future__ import annotations

import math

import torch
from torch import nn

from neuroal.data import load_text
from neuroal.progress import progress


def eval_windows(tokenizer, corpus: str, seqlen: int, limit: int | None = None) -> torch.Tensor:
    """The test split tokenized as one text and cut into ``[windows, seqlen]`` (the tail is dropped),
    as the reference's ``eval_ppl`` does."""
    ids = tokenizer(load_text(corpus, "test"), return_tensors="pt").input_ids[0]
    count = ids.numel() // seqlen
    if limit is not None:
        count = min(count, limit)
    return ids[: count * seqlen].reshape(count, seqlen)


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, device: torch.device, batch_size: int = 8) -> float:
    """``exp`` of the mean next-token cross-entropy over all windows (each window scored alone)."""
    total, count = 0.0, 0
    for start in progress(range(0, windows.shape[0], batch_size), desc="perplexity"):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        loss = nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total += loss.item()
        count += batch[:, 1:].numel()
    return math.exp(total / count)
