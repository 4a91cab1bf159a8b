"""NeuroAl beyond the reference parity (tests/test_neuroal_reference.py): fused projections, the
dense mode and coarse strategy, early stopping, and what the CLI writes."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_family_configs

from neuroal.cli import main
from neuroal.models import prunable_matrices
from neuroal.pruning import base_method
from neuroal.pruning.allocators.neuroal import Options, search_lambdas
from neuroal.pruning.allocators.neuroal.math import BLOCK_LAMBDAS, ROW_LAMBDAS, block_lambdas, fit_rows

CPU = torch.device("cpu")
IDS = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(0))


def tiny(family):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_family_configs()[family]).eval()


def test_fit_rows_folds_and_repeats():
    from transformers import LlamaConfig

    config = LlamaConfig(num_attention_heads=4, num_key_value_heads=2, hidden_size=8)
    delta = torch.arange(8.0)  # 4 heads x head_dim 2: heads (0,1) share kv head 0, (2,3) kv head 1
    folded = torch.tensor([1.0, 2.0, 5.0, 6.0])
    assert torch.equal(fit_rows(delta, 8, config), delta)
    assert torch.equal(fit_rows(delta, 4, config), folded)
    assert torch.equal(fit_rows(delta, 16, config), torch.cat([delta, folded, folded]))  # fused q, k, v
    mha = LlamaConfig(num_attention_heads=4, num_key_value_heads=4, hidden_size=8)
    per_head = fit_rows(delta, 24, mha, "per_head")  # GPT-NeoX: [q_h; k_h; v_h] per head
    assert torch.equal(per_head[:6], torch.tensor([0.0, 1, 0, 1, 0, 1]))
    with pytest.raises(ValueError):
        fit_rows(delta, 7, config)


@pytest.mark.parametrize("family", ["Phi3ForCausalLM", "GPTNeoXForCausalLM", "OPTForCausalLM", "PhiForCausalLM"])
def test_row_vectors_fit_every_family(family):
    model = tiny(family)
    result = search_lambdas(model, base_method("wanda"), 0.6, IDS, CPU, Options(mode="dense"))
    linears = prunable_matrices(model)
    assert result.row_lambda is not None
    for name, target in result.allocation.items():
        assert isinstance(target, torch.Tensor) and target.numel() == linears[name].out_features, name


@pytest.mark.parametrize("mode", ["reference", "dense"])
def test_coarse_strategy_evaluates_fewer_and_agrees_with_the_grid_scores(mode):
    model = tiny("LlamaForCausalLM")
    grid = search_lambdas(model, base_method("wanda"), 0.7, IDS, CPU, Options(mode=mode, strategy="grid"))
    coarse = search_lambdas(model, base_method("wanda"), 0.7, IDS, CPU, Options(mode=mode, strategy="coarse"))
    assert len(coarse.block_scores) < len(grid.block_scores)
    complete = {k: v for k, v in coarse.block_scores.items() if k not in coarse.block_stopped}
    for lam, score in complete.items():
        assert score == pytest.approx(grid.block_scores[lam], rel=1e-9)
    assert grid.block_scores[grid.block_lambda] == min(
        v for k, v in grid.block_scores.items() if k not in grid.block_stopped
    )


def test_stopped_candidates_could_not_have_won():
    """Early stopping: a stopped candidate's partial score already exceeds the winner's score."""
    model = tiny("LlamaForCausalLM")
    result = search_lambdas(model, base_method("magnitude"), 0.7, IDS, CPU, Options(mode="dense"))
    for lam in result.block_stopped:
        assert result.block_scores[lam] >= result.block_scores[result.block_lambda]


def test_sparsegpt_runs_the_block_step_only():
    result = search_lambdas(tiny("LlamaForCausalLM"), base_method("sparsegpt"), 0.5, IDS, CPU)
    assert result.row_lambda is None and all(isinstance(t, float) for t in result.allocation.values())


def test_cli_records_the_search_and_plots_it(tiny_llama, tmp_path):
    out = tmp_path / "neuroal"
    args = ["prune", "--model", str(tiny_llama), "--method", "wanda", "--top-up", "neuroal", "--sparsity", "0.7",
            "--neuroal-mode", "dense", "--calib", "lee", "--nsamples", "4", "--search-nsamples", "2",
            "--seqlen", "32", "--out", str(out)]
    assert main(args) == 0
    manifest = json.loads((out / "neuroal.json").read_text())
    search = manifest["allocation"]["neuroal"]
    assert search["mode"] == "dense"
    assert manifest["summary"] == {"block_lambda": search["block_lambda"], "row_lambda": search["row_lambda"],
                                   "mode": "dense"}
    assert str(search["block_lambda"]) in search["block_scores"] and len(search["block_sparsities"]) == 3
    assert len(search["row_sparsities"]) == 3 * 7
    assert (out / "allocation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert manifest["achieved_sparsity"] == pytest.approx(0.7, abs=0.02)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_dense_statistics_are_cached_on_disk_and_verified(tmp_path, monkeypatch, caplog, method):
    """The dense pass runs once per (model, search set); later searches read the file, and a
    corrupted file is recomputed rather than trusted. All three choose the same allocation."""
    from neuroal.pruning.allocators.neuroal import search as search_module

    model, wanted = tiny("LlamaForCausalLM"), base_method(method)
    cache = search_module.dense_cache_file(tmp_path, "model-digest", wanted, IDS, model, CPU)
    first = search_lambdas(model, wanted, 0.6, IDS, CPU, Options(mode="dense"), dense_cache=cache)
    assert cache.is_file()
    assert search_module.dense_cache_file(tmp_path, "other-model", wanted, IDS, model, CPU) != cache
    assert search_module.dense_cache_file(tmp_path, "model-digest", wanted, IDS[:2], model, CPU) != cache
    import neuroal.environment  # other torch, other statistics: another entry

    monkeypatch.setattr(neuroal.environment, "installed_version", lambda name: "0.0-other")
    assert search_module.dense_cache_file(tmp_path, "model-digest", wanted, IDS, model, CPU) != cache
    monkeypatch.undo()

    real_pass = search_module._Search._dense_pass
    calls = []
    monkeypatch.setattr(search_module._Search, "_dense_pass", lambda self: calls.append(1) or real_pass(self))
    cached = search_lambdas(model, wanted, 0.6, IDS, CPU, Options(mode="dense"), dense_cache=cache)
    assert calls == [] and cached.to_dict() == first.to_dict()

    data = bytearray(cache.read_bytes())
    data[-3] ^= 0xFF  # corrupt one byte of the last tensor
    cache.write_bytes(bytes(data))
    with caplog.at_level("WARNING"):
        rebuilt = search_lambdas(model, wanted, 0.6, IDS, CPU, Options(mode="dense"), dense_cache=cache)
    assert calls == [1] and "corrupt" in caplog.text and rebuilt.to_dict() == first.to_dict()
    search_lambdas(model, wanted, 0.6, IDS, CPU, Options(mode="dense"), dense_cache=cache)
    assert calls == [1]  # the rebuilt entry was written back


@pytest.mark.parametrize("values", [BLOCK_LAMBDAS, ROW_LAMBDAS, block_lambdas(0.8)])
def test_coarse_walk_finds_the_minimum_of_any_single_minimum_curve(values):
    from neuroal.pruning.walks import coarse_walk

    n = len(values)
    for minimum in range(n):
        for curve in (lambda i: (i - minimum) ** 2, lambda i: abs(values[i] - values[minimum]) ** 0.5 + 0.01 * i):
            walk, best = coarse_walk(list(values)), None
            probed = [next(walk)]
            while True:
                index = probed[-1]
                if best is None or curve(index) < curve(best):
                    best = index
                try:
                    probed.append(walk.send(best))
                except StopIteration:
                    break
            assert best == minimum and len(set(probed)) == len(probed) <= 7


def test_a_grid_with_lambda_zero_can_fall_back_to_uniform():
    """``--neuroal-lambdas`` with 0: that candidate puts every block at the target, and it is scored
    like any other (it wins here, the only one left); a grid out of order is refused."""
    model = tiny("LlamaForCausalLM")
    result = search_lambdas(model, base_method("wanda"), 0.6, IDS, CPU, Options(lambdas=(0.0,), step="block"))
    assert result.block_lambda == 0.0 and list(result.block_scores) == [0.0]
    assert list(result.allocation.values()) == pytest.approx([0.6] * len(result.allocation))
    both = search_lambdas(model, base_method("wanda"), 0.6, IDS, CPU, Options(lambdas=(0.0, 0.2), strategy="grid"))
    assert set(both.block_scores) == {0.0, 0.2} and set(both.row_scores) <= {0.0, 0.2}
    with pytest.raises(ValueError, match="ascending"):
        Options(lambdas="0.2,0.1")
    assert Options(lambdas="0,0.05").lambdas == (0.0, 0.05)  # as --neuroal-lambdas gives it
