"""Perplexity against a direct computation written out here; `neuroal eval` on checkpoints."""

from __future__ import annotations

import json
import importlib
import math

import pytest
import torch

from neuroal.cli import main
from neuroal.config import PruneConfig
from neuroal.data import load_text
from neuroal.evaluation import eval_windows, perplexity
from neuroal.evaluation.zeroshot import zero_shot
from neuroal.models import load_model, resolve_model
from neuroal.pipeline import Plan, prune_in_memory


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


def test_large_vocabularies_score_fewer_windows_per_forward(tiny_llama, tokenizer, monkeypatch):
    """The logits budget bounds memory; the perplexity does not depend on it."""
    ppl = importlib.import_module("neuroal.evaluation.perplexity")  # the package exports a function of that name

    model, _ = load_model(resolve_model(str(tiny_llama)))
    windows = eval_windows(tokenizer, "lee", 32, limit=5)
    whole = perplexity(model, windows, torch.device("cpu"), batch_size=8)
    rows = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda input_ids, **kw: rows.append(len(input_ids)) or forward(input_ids, **kw))
    monkeypatch.setattr(ppl, "_LOGITS_BUDGET", 2 * 32 * model.config.vocab_size * 4)  # two windows' logits
    assert perplexity(model, windows, torch.device("cpu"), batch_size=8) == pytest.approx(whole, rel=1e-6)
    assert rows == [2, 2, 1]
    assert ppl.rows_within_logits_budget(10**6, 10**6) == 1  # one window even past the budget



def _prune_tiny(tiny_llama, out):
    args = ["prune", "--model", str(tiny_llama), "--method", "wanda", "--sparsity", "0.5", "--nsamples", "4",
            "--seqlen", "32", "--calib", "lee", "--out", str(out)]
    assert main(args) == 0


def test_eval_of_checkpoint_equals_model_in_memory(tiny_llama, tmp_path, capsys):
    """`neuroal eval` on a saved checkpoint gives the numbers of the same pruned model in memory,
    and records the checkpoint's manifest with them."""
    _prune_tiny(tiny_llama, tmp_path / "ckpt")
    capsys.readouterr()
    out = tmp_path / "metrics.json"
    args = ["eval", "--model", str(tmp_path / "ckpt"), "--ppl", "lee,treebank", "--tasks", "arc_easy",
            "--limit", "3", "--seqlen", "32", "--batch-size", "2", "--out", str(out)]
    assert main(args) == 0
    metrics = json.loads(out.read_text())
    assert "ppl lee" in capsys.readouterr().out  # the readable table

    config = PruneConfig(model=str(tiny_llama), method="wanda", sparsity=0.5, nsamples=4, seqlen=32, calib="lee")
    model, tokenizer, _ = prune_in_memory(Plan.of(config))
    cpu = torch.device("cpu")
    for corpus in ("lee", "treebank"):
        assert metrics["ppl"][corpus] == perplexity(model, eval_windows(tokenizer, corpus, 32, 3), cpu, 2)
    assert metrics["tasks"] == zero_shot(model, tokenizer, ["arc_easy"], limit=3, batch_size=2, device=cpu, offline=True)
    assert metrics["checkpoint"]["method"] == "wanda" and metrics["checkpoint"]["target_sparsity"] == 0.5
    assert metrics["limit"] == 3 and metrics["seqlen"] == 32 and metrics["lm_eval_version"]


def test_eval_refuses_a_corrupt_checkpoint(tiny_llama, tmp_path, capsys):
    _prune_tiny(tiny_llama, tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte: same size, still parses, wrong weights
    weights.write_bytes(bytes(data))
    out = tmp_path / "metrics.json"
    capsys.readouterr()  # the prune's progress bars
    assert main(["eval", "--model", str(tmp_path / "ckpt"), "--tasks", "none", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "corrupt" in err and not out.exists()


@pytest.mark.parametrize(
    ("extra", "needle"),
    [(["--ppl", "nonsense"], "unknown corpus"), (["--tasks", "mmlu"], "unknown offline task"),
     (["--limit", "0"], "--limit"), (["--model", "/nowhere/model"], "does not exist")],
)
def test_eval_bad_input_is_one_line_exit_2(tiny_llama, tmp_path, capsys, extra, needle):
    out = tmp_path / "metrics.json"
    assert main(["eval", "--model", str(tiny_llama), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err
    assert not out.exists()
