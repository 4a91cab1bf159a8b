"""RIA (``--method ria``): the score against its formula written out element by element, its masks
(per row at one sparsity, per-row sparsities, N:M), and pruning through the CLI with every
allocator and every architecture family."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import FAMILIES
from neuroal.cli import main
from neuroal.models import prunable_matrices
from neuroal.pruning import base_method
from neuroal.pruning.methods.ria import ria_score
from neuroal.pruning.statistics import NORMS, InputStats

RIA = base_method("ria")


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ria_transcription(w: torch.Tensor, act_norm: torch.Tensor, a: float) -> torch.Tensor:
    """``(|W_ij| / sum_k |W_ik| + |W_ij| / sum_k |W_kj|) * act_norm_j ** a``, one entry at a time."""
    rows, cols = w.shape
    m = [[abs(w[i, j].item()) for j in range(cols)] for i in range(rows)]
    row_sum = [sum(m[i][k] for k in range(cols)) for i in range(rows)]
    col_sum = [sum(m[k][j] for k in range(rows)) for j in range(cols)]
    return torch.tensor([[(m[i][j] / row_sum[i] + m[i][j] / col_sum[j]) * act_norm[j].item() ** a
                          for j in range(cols)] for i in range(rows)], dtype=torch.float64)


def stats_of(inputs: torch.Tensor) -> InputStats:
    """NORMS statistics of ``[samples, tokens, in]`` inputs, one sample per batch as the authors."""
    stats = InputStats(frozenset((NORMS,)))
    for sample in inputs:
        stats.add(sample.unsqueeze(0))
    return stats


def per_row_transcription(scores: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Row r prunes its ``counts[r]`` lowest scores (ties: lower index)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    for r, row in enumerate(scores.tolist()):
        for j in sorted(range(len(row)), key=lambda j: (row[j], j))[: counts[r]]:
            mask[r, j] = True
    return mask


# ---------------------------------------------------------------- score


@pytest.mark.parametrize("a", [0.5, 1.0, 0.0])
def test_score_matches_formula(a):
    w = torch.randn(5, 7, generator=seeded(0))
    act_norm = torch.rand(7, generator=seeded(1)) + 0.1
    got = ria_score(w, act_norm, a)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), ria_transcription(w, act_norm, a), rtol=1e-5)
    assert torch.allclose(ria_score(w.half(), act_norm, a), ria_score(w.half().float(), act_norm, a))


def test_default_exponent_is_half():
    w, act_norm = torch.randn(3, 4, generator=seeded(2)), torch.rand(4, generator=seeded(3))
    assert torch.equal(ria_score(w, act_norm), ria_score(w, act_norm, 0.5))


def test_zero_row_or_column_scores_zero_not_nan():
    w = torch.randn(4, 6, generator=seeded(4))
    w[1, :] = 0
    w[:, 2] = 0
    score = ria_score(w, torch.ones(6))
    assert torch.isfinite(score).all()
    assert (score[1] == 0).all() and (score[:, 2] == 0).all()


def test_method_reads_the_authors_activation_norm():
    """The authors' ``sqrt(scaler_row)``: a running mean over samples of ``||X_j||^2``, updated
    one sample at a time (``WrappedGPT.add_batch``), raised to ``a`` = 0.5."""
    inputs = torch.randn(3, 10, 8, generator=seeded(5))
    scaler_row, nsamples = torch.zeros(8), 0
    for sample in inputs:
        scaler_row *= nsamples / (nsamples + 1)
        nsamples += 1
        scaler_row += torch.norm(sample.t(), p=2, dim=1) ** 2 / nsamples
    w = torch.randn(6, 8, generator=seeded(6))
    assert RIA.statistics == frozenset((NORMS,))
    expected = ria_transcription(w, torch.sqrt(scaler_row), 0.5)
    assert torch.allclose(RIA.score(w, stats_of(inputs)).double(), expected, rtol=1e-5)


# ---------------------------------------------------------------- masks


def test_mask_prunes_the_lowest_scores_of_each_row():
    w = torch.randn(6, 10, generator=seeded(7))
    stats = stats_of(torch.randn(2, 5, 10, generator=seeded(8)))
    scores = RIA.score(w, stats)
    weight, mask = RIA.prune(w, stats, 0.6, None)
    assert weight is w
    assert torch.equal(mask, per_row_transcription(scores, [math.floor(0.6 * 10)] * 6))


def test_mask_with_one_sparsity_per_row():
    w = torch.randn(4, 10, generator=seeded(9))
    stats = stats_of(torch.randn(2, 5, 10, generator=seeded(10)))
    targets = torch.tensor([0.1, 0.5, 0.75, 0.9])
    counts = [10 - math.floor((1 - s) * 10) for s in targets.double().tolist()]
    _, mask = RIA.prune(w, stats, targets, None)
    assert torch.equal(mask, per_row_transcription(RIA.score(w, stats), counts))


def test_mask_two_of_four():
    w = torch.randn(5, 16, generator=seeded(11))
    stats = stats_of(torch.randn(2, 5, 16, generator=seeded(12)))
    scores = RIA.score(w, stats)
    _, mask = RIA.prune(w, stats, 0.5, (2, 4))
    expected = torch.zeros_like(mask)
    for start in range(0, 16, 4):  # each group of 4 consecutive inputs of a row loses its 2 lowest
        expected[:, start : start + 4] = per_row_transcription(scores[:, start : start + 4], [2] * 5)
    assert torch.equal(mask, expected)


# ---------------------------------------------------------------- CLI


def prune(model, out, top_up: str, sparsity: float, *extra: str) -> int:
    return main(["prune", "--model", str(model), "--method", "ria", "--top-up", top_up, "--sparsity", str(sparsity),
                 "--calib", "lee", "--nsamples", "4", "--seqlen", "32", "--out", str(out), *extra])


def saved_linears(folder) -> dict:
    from transformers import AutoModelForCausalLM

    return prunable_matrices(AutoModelForCausalLM.from_pretrained(folder))


def achieved(linears: dict) -> float:
    zeros = sum(int((lin.weight == 0).sum()) for lin in linears.values())
    return zeros / sum(lin.weight.numel() for lin in linears.values())


@pytest.mark.parametrize("top_up,extra,tolerance", [
    ("uniform", (), 0.01),
    # OWL's per-module sparsities, floored per row, lose up to one weight a row (1/64 here): it
    # reaches 0.5896 on this model with Wanda as with RIA
    ("owl", (), 1 / 64),
    ("neuroal", ("--search-nsamples", "2"), 0.01),  # the search set must fit in --nsamples 4
])
def test_cli_prunes_with_every_allocator(tiny_llama, tmp_path, top_up, extra, tolerance):
    assert prune(tiny_llama, tmp_path / "out", top_up, 0.6, *extra) == 0
    assert achieved(saved_linears(tmp_path / "out")) == pytest.approx(0.6, abs=tolerance)


def test_cli_two_of_four(tiny_llama, tmp_path):
    assert prune(tiny_llama, tmp_path / "out", "uniform", 0.5, "--structure", "2:4") == 0
    linears = saved_linears(tmp_path / "out")
    assert achieved(linears) == pytest.approx(0.5, abs=0.01)
    for name, lin in linears.items():
        assert torch.all((lin.weight == 0).reshape(lin.out_features, -1, 4).sum(dim=-1) == 2), name


@pytest.mark.parametrize("family", FAMILIES)
def test_cli_prunes_every_family(family_folders, family, tmp_path):
    assert prune(family_folders[family], tmp_path / "out", "uniform", 0.6) == 0
    linears = saved_linears(tmp_path / "out")
    for name, lin in linears.items():  # uniform: every row at floor(0.6 * in)
        assert torch.all((lin.weight == 0).sum(dim=1) == math.floor(0.6 * lin.in_features)), name
    assert achieved(linears) == pytest.approx(0.6, abs=1 / min(lin.in_features for lin in linears.values()))
