"""ATP (Huang et al., ICML 2025): the progression and grid against the paper's Eq. 10 and the
authors' ``main.py``/``search.sh`` written out here, the search's scores against the pipeline's
own prune followed by perplexity, and the CLI on every family."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from decimal import Decimal
from itertools import pairwise

import pytest
import torch
from conftest import FAMILIES, SMOLLM2_VOCAB

from neuroal.cli import main
from neuroal.errors import UserError
from neuroal.evaluation.perplexity import perplexity
from neuroal.models import load_model, matrices_by_block, prunable_matrices, resolve_model
from neuroal.pruning.allocation import expand_to_modules
from neuroal.pruning.allocators import atp
from neuroal.pruning.allocators.atp.math import DEFAULT_STEP, atp_sparsities, best_beta, beta_grid, max_beta
from neuroal.pruning.plugin import AllocationInputs, BaseMethod
from neuroal.pruning.prune import prune_model
from neuroal.pruning.registry import BASE_METHODS, allocator

CPU = torch.device("cpu")
IDS = torch.randint(0, SMOLLM2_VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: on the busy 2-core machine a search candidate took ~0.9 s with two
    threads (contention) and ~0.13 s with one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------- the math


def eq10(num_layers, mean, beta):
    """Paper Eq. 10: s_i = S - beta (L - 1) / 2 + beta (i - 1), i = 1..L."""
    return [mean - beta * (num_layers - 1) / 2 + beta * (i - 1) for i in range(1, num_layers + 1)]


@pytest.mark.parametrize("num_layers, mean, beta",
                         [(32, 0.7, 0.01), (32, 0.5, 0.002), (3, 0.6, 0.192), (80, 0.7, 0.006)])
def test_progression_is_eq10(num_layers, mean, beta):
    result = atp_sparsities(num_layers, mean, beta)
    assert result == pytest.approx(eq10(num_layers, mean, beta), abs=1e-12)
    assert result[0] == pytest.approx(mean - beta * (num_layers - 1) / 2, abs=1e-12)
    assert result[-1] == pytest.approx(mean + beta * (num_layers - 1) / 2, abs=1e-12)
    assert all(b - a == pytest.approx(beta, abs=1e-12) for a, b in pairwise(result))  # increasing by beta
    assert sum(result) / num_layers == pytest.approx(mean, abs=1e-12)  # plain mean, not parameter-weighted


def search_sh_grid(num_layers, mean):
    """Transcription of the authors' search.sh (beta counted in exact decimal by bc, from 0.002 in
    steps of 0.002) stopped by main.py's check `beta > min(2S/(L-1), 2(1-S)/(L-1))`: "Illegal beta"."""
    grid, beta = [], Decimal("0.002")
    while not float(beta) > min(2 * mean / (num_layers - 1), 2 * (1 - mean) / (num_layers - 1)):
        grid.append(float(beta))
        beta += Decimal("0.002")
    return grid


@pytest.mark.parametrize("num_layers, mean", [(32, 0.7), (80, 0.7), (32, 0.5), (3, 0.6), (2, 0.6), (26, 0.35)])
def test_grid_is_the_authors_search(num_layers, mean):
    assert beta_grid(num_layers, mean) == search_sh_grid(num_layers, mean)


def test_grid_matches_the_papers_examples():
    # Sec. 3.4: LLaMA3-8B, 32 layers at S = 0.7: "0 < beta <= 0.019", "we only need to make 9 attempts".
    assert max_beta(32, 0.7) == pytest.approx(0.6 / 31, abs=1e-15)
    assert round(max_beta(32, 0.7), 3) == 0.019
    assert beta_grid(32, 0.7) == [0.002, 0.004, 0.006, 0.008, 0.01, 0.012, 0.014, 0.016, 0.018]
    # "for the largest 70B model, the reasonable range of beta is 0 < beta <= 0.0075 ... only 3 attempts"
    assert beta_grid(80, 0.7) == [0.002, 0.004, 0.006]
    assert DEFAULT_STEP == 0.002


def test_a_coarser_step_takes_every_legal_multiple():
    assert beta_grid(3, 0.6, step=0.1) == [0.1, 0.2, 0.3, 0.4]  # bound 2 * 0.4 / 2 = 0.4, reached


def test_the_bound_is_legal_and_past_it_is_not():
    assert atp_sparsities(3, 0.5, 0.5) == [0.0, 0.5, 1.0]  # at the bound: ends exactly 0 and 1
    assert all(0.0 <= s <= 1.0 for s in atp_sparsities(3, 0.6, max_beta(3, 0.6)))
    with pytest.raises(ValueError, match="illegal ATP beta"):
        atp_sparsities(32, 0.7, 0.02)  # > 0.6 / 31: the last layer would pass 1
    with pytest.raises(ValueError, match="illegal ATP beta"):
        atp_sparsities(32, 0.7, -0.002)


def test_nothing_to_search_for_one_block_or_no_sparsity():
    assert beta_grid(1, 0.6) == []
    assert atp_sparsities(1, 0.6, 0.3) == [0.6]
    assert beta_grid(4, 0.0) == []
    assert atp_sparsities(4, 0.0, 0.0) == [0.0] * 4


def test_best_beta_lowest_then_smallest_and_never_nan():
    # search.sh keeps the first best: a later candidate must be strictly lower to replace it
    assert best_beta({0.006: 3.0, 0.004: 2.0, 0.002: 2.0}) == 0.002
    assert best_beta({0.002: 5.0, 0.004: 4.0, 0.006: 4.5}) == 0.004
    assert best_beta({0.002: float("nan"), 0.004: 9.0}) == 0.004
    with pytest.raises(ValueError):
        best_beta({})


# ------------------------------------------------------------------------------- the search


@pytest.fixture(scope="module")
def llama_model(tiny_llama):
    model, _ = load_model(resolve_model(str(tiny_llama)))
    return model


def inputs_for(model, method="wanda", sparsity=0.6, batch_size=2):
    method = BASE_METHODS[method] if isinstance(method, str) else method
    return AllocationInputs(model, prunable_matrices(model), sparsity, method, CPU, batch_size, calibration_ids=IDS)


def pipeline_loss(model, method, sparsity, beta, batch_size):
    """What the authors' main.py does for one beta, with this project's own parts: the pipeline's
    layer-sequential prune at Eq. 10's block sparsities, then the perplexity of the pruned model."""
    pruned = copy.deepcopy(model)
    blocks = matrices_by_block(pruned)
    targets = expand_to_modules(atp_sparsities(len(blocks), sparsity, beta), [list(b) for b in blocks])
    prune_model(pruned, method, targets, IDS, CPU, batch_size)
    return math.log(perplexity(pruned, IDS, CPU, batch_size))


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude"])
@pytest.mark.parametrize("logit_rows", [None, 1])
def test_scores_are_the_pipelines_prune_then_perplexity(llama_model, monkeypatch, method, logit_rows):
    if logit_rows:  # the head scores fewer windows per forward than a block batch: pieces must line up
        monkeypatch.setattr(atp, "rows_within_logits_budget", lambda *_: logit_rows)
    betas = [0.1, 0.3]
    losses = atp.calibration_losses(inputs_for(llama_model, method), betas)
    assert list(losses) == betas
    for beta in betas:
        assert losses[beta] == pytest.approx(pipeline_loss(llama_model, BASE_METHODS[method], 0.6, beta, 2), rel=1e-6)
    assert losses[0.1] != losses[0.3]


def keep_everything(weight, stats, target, structure):
    return weight, torch.zeros_like(weight, dtype=torch.bool)


def test_when_pruning_changes_nothing_every_candidate_ties_and_the_first_wins(llama_model):
    """A known answer: a base method that prunes nothing leaves every candidate at the dense model's
    loss, so the search returns the grid's first beta with the dense perplexity for all."""
    method = BaseMethod("keep", "prunes nothing", frozenset(), keep_everything)
    allocation = atp.allocate(inputs_for(llama_model, method), atp.Options(step=0.1))
    dense = perplexity(llama_model, IDS, CPU, 2)
    scores = allocation.details["calibration_perplexity"]
    assert list(scores) == ["0.1", "0.2", "0.3", "0.4"]
    assert all(s == pytest.approx(dense, rel=1e-6) for s in scores.values())
    assert allocation.details["beta"] == 0.1
    assert allocation.details["block_sparsities"] == pytest.approx([0.5, 0.6, 0.7], abs=1e-12)


def test_allocate_takes_the_lowest_score_and_records_them(llama_model, monkeypatch):
    def fake_losses(inputs, betas, **_):
        return {b: (b - 0.3) ** 2 + 1 for b in betas}  # lowest at 0.3

    monkeypatch.setattr(atp, "calibration_losses", fake_losses)
    allocation = atp.allocate(inputs_for(llama_model), atp.Options(step=0.1))
    details = allocation.details
    assert details["beta"] == 0.3 and details["searched"] is True
    assert details["step"] == 0.1 and details["max_beta"] == pytest.approx(0.4)
    expected_scores = {str(b): math.exp((b - 0.3) ** 2 + 1) for b in (0.1, 0.2, 0.3, 0.4)}
    assert details["calibration_perplexity"] == pytest.approx(expected_scores)
    expected = atp_sparsities(3, 0.6, 0.3)
    assert details["block_sparsities"] == expected
    for name, target in allocation.targets.items():
        assert target == expected[int(name.split(".")[2])]  # model.layers.<i>.<module>
    json.dumps(details)  # recorded in the manifest as is


def test_a_coarse_walk_on_the_search_set_scores_fewer_candidates_and_finds_a_single_minimum(llama_model,
                                                                                           monkeypatch):
    """``--atp-strategy coarse --atp-search-set``: the golden-section walk over the same grid probes
    a few betas and still finds the minimum of a curve with one; they are scored on the search set."""
    grid = atp.beta_grid(3, 0.6, 0.01)  # 40 candidates
    bottom, scored_ids = grid[27], []
    # A candidate's "outputs" are its block sparsities, and its loss how far block 0's is from the
    # one of beta = bottom (0.6 - beta for three equal blocks): a curve with one minimum.
    monkeypatch.setattr(atp, "pruned_outputs", lambda blocks, dense, method, sparsities, device: sparsities)
    monkeypatch.setattr(atp, "head_loss", lambda model, blocks, final, ids, device, batch_size:
                        scored_ids.append(ids) or abs(final[0] - (0.6 - bottom)))
    inputs = dataclasses.replace(inputs_for(llama_model), search_ids=IDS[:2])
    details = atp.allocate(inputs, atp.Options(step=0.01, strategy="coarse", search_set=True)).details
    assert details["beta"] == bottom and details["scored_on"] == "search set" and details["strategy"] == "coarse"
    assert 3 <= len(details["calibration_perplexity"]) <= 10 < len(grid)
    assert all(torch.equal(ids, IDS[:2]) for ids in scored_ids)
    assert atp.ALLOCATOR.searches(atp.Options(search_set=True)) and not atp.ALLOCATOR.searches(atp.Options())


def test_a_given_beta_skips_the_search(llama_model, monkeypatch):
    monkeypatch.setattr(atp, "calibration_losses", lambda *_: pytest.fail("searched"))
    allocation = atp.allocate(inputs_for(llama_model), atp.Options(beta=0.05))
    assert allocation.details["searched"] is False
    assert allocation.details["block_sparsities"] == pytest.approx([0.55, 0.6, 0.65], abs=1e-12)
    with pytest.raises(UserError, match="illegal ATP beta"):
        atp.allocate(inputs_for(llama_model), atp.Options(beta=0.5))  # > 0.4 for 3 blocks at 0.6


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude"])
def test_allocate_leaves_the_weights_unchanged(llama_model, method):
    before = {k: v.clone() for k, v in llama_model.state_dict().items()}
    atp.allocate(inputs_for(llama_model, method), atp.Options(step=0.1))
    after = llama_model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_registered_with_data():
    chosen = allocator("atp")
    assert chosen.reads_data and not chosen.searches(chosen.Options()) and not chosen.keeps_structure
    assert "Huang et al., ICML 2025" in chosen.help


# ------------------------------------------------------------------------------- the CLI


def prune_cli(model, out, *extra) -> int:
    return main(["prune", "--model", str(model), "--method", "wanda", "--top-up", "atp", "--sparsity", "0.6",
                 "--calib", "lee", "--nsamples", "4", "--seqlen", "32", "--out", str(out), *extra])


def check_checkpoint(out):
    """The saved weights: each row pruned at ``int(in * s_block)`` (Wanda per row, as the authors'
    ``prune_wanda``) with the recorded block sparsities, which increase with depth. Returns the
    achieved sparsity, the per-block sparsities counted from the weights, and the details."""
    from transformers import AutoModelForCausalLM

    details = json.loads((out / "neuroal.json").read_text())["allocation"]
    model = AutoModelForCausalLM.from_pretrained(out)
    blocks = matrices_by_block(model)
    assert details["block_sparsities"] == sorted(details["block_sparsities"])
    counted = []
    for block, sparsity in zip(blocks, details["block_sparsities"], strict=True):
        for name, lin in block.items():
            assert torch.all((lin.weight == 0).sum(dim=1) == int(lin.in_features * sparsity)), name
        counted.append(sum(int((lin.weight == 0).sum()) for lin in block.values())
                       / sum(lin.weight.numel() for lin in block.values()))
    linears = prunable_matrices(model)
    achieved = sum(int((lin.weight == 0).sum()) for lin in linears.values()) / sum(
        lin.weight.numel() for lin in linears.values())
    return achieved, counted, details


@pytest.mark.slow  # the paper's grid: 200 candidates for 3 blocks at 0.6 (~30 s on 2 busy cores)
def test_cli_default_search(tiny_llama, tmp_path):
    out = tmp_path / "pruned"
    assert prune_cli(tiny_llama, out) == 0
    achieved, counted, details = check_checkpoint(out)
    assert achieved == pytest.approx(0.6, abs=0.01)
    assert counted == sorted(counted) and counted[0] < counted[-1]
    assert details["searched"] and details["step"] == DEFAULT_STEP
    grid = beta_grid(3, 0.6)
    assert list(details["calibration_perplexity"]) == [str(b) for b in grid]  # 200 candidates, 0.002..0.4
    assert details["beta"] in grid


def test_cli_given_beta(tiny_llama, tmp_path):
    out = tmp_path / "pruned"
    assert prune_cli(tiny_llama, out, "--atp-beta", "0.1") == 0
    achieved, counted, details = check_checkpoint(out)
    assert details["searched"] is False and details["block_sparsities"] == pytest.approx([0.5, 0.6, 0.7])
    assert achieved == pytest.approx(0.6, abs=0.01)
    assert counted[0] < counted[1] < counted[2]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family(family_folders, family, tmp_path):
    folder = family_folders[family]
    # The search's head pass (last block's outputs through the model's own norm/head) scores as the
    # whole model does, in every family (softcapping, OPT's projection, sliding windows, ...).
    model, _ = load_model(resolve_model(str(folder)))
    loss = atp.calibration_losses(inputs_for(model, "wanda"), [0.3])[0.3]
    assert loss == pytest.approx(pipeline_loss(model, BASE_METHODS["wanda"], 0.6, 0.3, 2), rel=1e-5)

    out = tmp_path / "pruned"
    assert prune_cli(folder, out, "--atp-step", "0.1") == 0  # 2 blocks: 8 candidates, 0.1..0.8
    achieved, counted, details = check_checkpoint(out)
    assert details["beta"] in beta_grid(2, 0.6, 0.1)
    assert counted[0] < counted[1]
    smallest = min(lin.in_features for lin in prunable_matrices(model).values())
    assert achieved == pytest.approx(0.6, abs=1 / smallest)  # int(s * in) per row drops < 1 weight a row
