"""Perplexity against a direct computation written out here."""

from __future__ import annotations

import math

import pytest
import torch

from neuroal.data import load_text
from neuroal.evaluation import eval_windows, perplexity
from neuroal.models import load_model, resolve_model


def test_windows_are_the_test_text_cut_in_order(tokenizer):
    windows = eval_windows(tokenizer, "lee", 64)
    ids = tokenizer(load_text("lee", "test"), return_tensors="pt").input_ids[0]
    assert windows.shape == (ids.numel() // 64, 64)
    assert torch.equal(windows.flatten(), ids[: windows.numel()])
    assert eval_windows(tokenizer, "lee", 64, limit=3).shape == (3, 64)


def test_perplexity_equals_direct_computation(tiny_llama, tokenizer):
    model, _ = load_model(resolve_model(str(tiny_llama)))
    windows = eval_windows(tokenizer, "lee", 32, limit=5)
    nll, count = 0.0, 0
    with torch.no_grad():
        for window in windows:  # one window at a time, log-softmax by hand
            logits = model(input_ids=window[None]).logits[0].double()
            logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
            for t in range(len(window) - 1):
                nll -= logp[t, window[t + 1]].item()
                count += 1
    assert perplexity(model, windows, torch.device("cpu"), batch_size=2) == pytest.approx(math.exp(nll / count), rel=1e-5)

