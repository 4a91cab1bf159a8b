"""Base methods beyond magnitude and Wanda: multiflow scores, N:M masks and the SparseGPT solver,
checked against the formulas written out here."""

from __future__ import annotations

import logging

import pytest
import torch

from neuroal.errors import UserError
from neuroal.pruning.masks import nm_mask, parse_structure, row_mask
from neuroal.pruning.methods.magnitude import magnitude_score
from neuroal.pruning.methods.multiflow import multiflow_score
from neuroal.pruning.methods.wanda import wanda_score
from neuroal.pruning.methods.sparsegpt import sparsegpt_prune
from neuroal.pruning.statistics import add_to_hessian


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- multiflow


def test_multiflow_score_matches_formula():
    w = torch.randn(4, 6, generator=seeded(0))
    a = torch.rand(6, generator=seeded(1))
    rows, cols = w.shape
    s = [[abs(w[i, j].item()) * a[j].item() for j in range(cols)] for i in range(rows)]
    i_out = [sum(s[i]) / cols for i in range(rows)]  # mean over the columns of each row
    i_in = [sum(s[i][j] for i in range(rows)) / rows for j in range(cols)]  # mean over the rows of each column
    expected = torch.tensor([[abs(w[i, j].item()) * i_out[i] * i_in[j] for j in range(cols)] for i in range(rows)])
    got = multiflow_score(w.half(), a)
    assert got.dtype == torch.float32
    assert torch.allclose(multiflow_score(w, a), expected, rtol=1e-5)


# ---------------------------------------------------------------- N:M masks


def nm_transcription(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In every row, for each group of m consecutive columns, mark the n lowest (ties: lower index)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    for r, row in enumerate(scores.tolist()):
        for start in range(0, len(row), m):
            group = range(start, start + m)
            for j in sorted(group, key=lambda j: (row[j], j))[:n]:
                mask[r, j] = True
    return mask


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_prunes_n_lowest_of_each_group(n, m):
    scores = torch.randn(5, 4 * m, generator=seeded(2))
    scores[0, :m] = 0.25  # a group of ties: the lower indices go
    scores[1, m : 2 * m] = scores[1, m]
    mask = nm_mask(scores, n, m)
    assert torch.equal(mask, nm_transcription(scores, n, m))
    assert (mask.reshape(5, -1, m).sum(dim=2) == n).all()


@pytest.mark.parametrize("n,m,cols", [(0, 4, 8), (4, 4, 8), (5, 4, 8), (2, 4, 10)])
def test_nm_mask_rejects_bad_structure(n, m, cols):
    with pytest.raises(UserError):
        nm_mask(torch.rand(2, cols), n, m)


@pytest.mark.parametrize(
    "text,expected", [("unstructured", None), ("2:4", (2, 4)), ("4:8", (4, 8)), (" 1:4 ", (1, 4))]
)
def test_parse_structure(text, expected):
    assert parse_structure(text) == expected


@pytest.mark.parametrize("text", ["2-4", "2:", "dense", "4:2", "0:4", "2:4:8", ""])
def test_parse_structure_rejects_bad_text(text):
    with pytest.raises(UserError, match="N:M"):
        parse_structure(text)


# ---------------------------------------------------------------- SparseGPT

ROWS, COLS, TOKENS = 32, 256, 1024  # two 128-column blocks; more tokens than columns, so H is full rank


@pytest.fixture(scope="module")
def problem():
    """A weight and inputs ``X = Z @ A``: anisotropic (column scales spread over a factor 10),
    correlated (16 shared latent factors), with a few high-norm (outlier) columns."""
    w = torch.randn(ROWS, COLS, generator=seeded(10))
    z = torch.randn(TOKENS, COLS, generator=seeded(11))
    factors = torch.randn(COLS, 16, generator=seeded(12)) @ torch.randn(16, COLS, generator=seeded(13))
    mix = torch.diag(torch.logspace(0, -1, COLS)) + 0.3 * factors / 4  # /4 = /sqrt(rank): unit-scale factors
    x = z @ mix
    x[:, [3, 77, 130, 200]] *= 10  # outlier features, as LLM activations have
    return w, x


def hessian_of(x: torch.Tensor, batch_rows: int = 4) -> torch.Tensor:
    """Accumulate ``x`` ([tokens, in]) as samples of ``TOKENS // 8`` tokens, ``batch_rows`` per batch."""
    samples = x.reshape(8, -1, x.shape[1])
    hessian, count = None, 0
    for start in range(0, 8, batch_rows):
        hessian, count = add_to_hessian(hessian, count, samples[start : start + batch_rows])
    assert count == 8
    return hessian


def test_hessian_is_two_over_n_sum_xtx():
    batches = [torch.randn(3, 5, 6, generator=seeded(20)), torch.randn(5, 6, generator=seeded(21)),
               torch.randn(2, 5, 6, generator=seeded(22)).half()]
    hessian, count = None, 0
    for batch in batches:
        hessian, count = add_to_hessian(hessian, count, batch)
    samples = [s.double() for b in batches for s in (b if b.dim() == 3 else b.unsqueeze(0))]
    expected = 2 / len(samples) * sum(s.T @ s for s in samples)
    assert count == len(samples) == 6
    assert hessian.dtype == torch.float32
    assert torch.allclose(hessian.double(), expected, rtol=1e-5, atol=1e-5)


def reconstruction_error(w: torch.Tensor, pruned: torch.Tensor, x: torch.Tensor) -> float:
    return torch.linalg.norm(w @ x.T - pruned @ x.T).item()


@pytest.mark.parametrize("structure", [None, (2, 4)], ids=["50%", "2:4"])
def test_sparsegpt_beats_magnitude_and_wanda(problem, structure):
    w, x = problem
    act_norm = torch.sqrt((x * x).sum(dim=0) / 8)
    n, m = structure or (0, 0)
    new, mask = sparsegpt_prune(w, hessian_of(x), 0.5, prune_n=n, prune_m=m)

    def by_score(score):
        return w.masked_fill(nm_mask(score, n, m) if structure else row_mask(score, 0.5), 0)

    errors = {
        "sparsegpt": reconstruction_error(w, new, x),
        "magnitude": reconstruction_error(w, by_score(magnitude_score(w)), x),
        "wanda": reconstruction_error(w, by_score(wanda_score(w, act_norm)), x),
    }
    logging.getLogger(__name__).info("reconstruction errors %s: %s", structure, errors)
    assert errors["sparsegpt"] < errors["wanda"] and errors["sparsegpt"] < errors["magnitude"], errors


def test_sparsegpt_unstructured_sparsity_and_updates(problem):
    w, x = problem
    new, mask = sparsegpt_prune(w, hessian_of(x), 0.5)
    # the reference prunes scores <= the int(numel * s)-th smallest: int(numel * s) + 1 per block
    for start in range(0, COLS, 128):
        assert mask[:, start : start + 128].sum().item() == int(ROWS * 128 * 0.5) + 1
    assert abs(mask.float().mean().item() - 0.5) * mask.numel() <= COLS // 128
    assert (new[mask] == 0).all()
    kept_changed = (new != w)[~mask].float().mean().item()
    assert kept_changed > 0.95  # only the very first column sees no update before it is fixed
    assert torch.isfinite(new).all()


def test_sparsegpt_nm_prunes_exactly_n_per_group(problem):
    w, x = problem
    new, mask = sparsegpt_prune(w, hessian_of(x), 0.5, prune_n=2, prune_m=4)
    assert (mask.reshape(ROWS, -1, 4).sum(dim=2) == 2).all()
    assert (new[mask] == 0).all()
    assert (new != w)[~mask].float().mean().item() > 0.95
    with pytest.raises(UserError):
        sparsegpt_prune(w, hessian_of(x), 0.5, prune_n=2, prune_m=4, blocksize=126)


def obs_transcription(w, hessian, sparsity, n=0, m=0, percdamp=0.01):
    """SparseGPT with one block, in float64, column by column: ``U`` = upper Cholesky factor of the
    damped ``H^-1``; column i's pruned weights are zeroed and ``(w - q) / U_ii * U_i,i:`` is taken
    off the columns from i on. Unstructured: one threshold on ``W^2 / diag(U)^2`` at the start;
    N:M: at each group's first column, the n lowest ``W^2 / diag(U)^2`` of the group."""
    w = w.double().clone()
    h = hessian.double().clone()
    h += percdamp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    mask = torch.zeros_like(w, dtype=torch.bool)
    if not n:
        score = w**2 / u.diagonal() ** 2
        mask = score <= score.flatten().sort().values[int(score.numel() * sparsity)]
    for i in range(w.shape[1]):
        if n and i % m == 0:
            group = w[:, i : i + m] ** 2 / u.diagonal()[i : i + m] ** 2
            mask[:, i : i + m] = nm_transcription(group, n, m)
        q = torch.where(mask[:, i], 0.0, w[:, i])
        err = (w[:, i] - q) / u[i, i]
        w[:, i:] -= err.unsqueeze(1) * u[i, i:].unsqueeze(0)
        w[:, i] = q
    return w, mask


@pytest.mark.parametrize("structure", [None, (2, 4)], ids=["50%", "2:4"])
def test_sparsegpt_matches_column_by_column_transcription(problem, structure):
    w, x = problem
    hessian = hessian_of(x)
    n, m = structure or (0, 0)
    expected, expected_mask = obs_transcription(w, hessian, 0.5, n, m)
    new, mask = sparsegpt_prune(w, hessian, 0.5, prune_n=n, prune_m=m, blocksize=COLS)
    # float32 vs float64 may flip a decision sitting on a threshold: allow 0.1%, compare the other rows
    assert (mask != expected_mask).float().mean().item() < 1e-3
    rows = (mask == expected_mask).all(dim=1)
    assert torch.allclose(new.double()[rows], expected[rows], rtol=1e-4, atol=1e-4)
    if structure:  # N:M decisions are made column by column on updated weights: blocking changes nothing
        blocked, blocked_mask = sparsegpt_prune(w, hessian, 0.5, prune_n=n, prune_m=m, blocksize=128)
        assert (blocked_mask != mask).float().mean().item() < 1e-3
        rows = (blocked_mask == mask).all(dim=1)
        assert torch.allclose(blocked[rows], new[rows], rtol=1e-4, atol=1e-4)


def test_sparsegpt_dead_input_column_gives_no_nan(problem):
    w, x = problem
    x = x.clone()
    x[:, [0, 129]] = 0  # inputs that are always zero: diag H == 0
    for n, m in [(0, 0), (2, 4)]:
        new, mask = sparsegpt_prune(w, hessian_of(x), 0.5, prune_n=n, prune_m=m)
        assert torch.isfinite(new).all()
        assert (new[:, [0, 129]] == 0).all()


def test_sparsegpt_keeps_dtype_and_leaves_inputs_alone(problem):
    w, x = problem
    hessian = hessian_of(x)
    w16, h_before = w.bfloat16(), hessian.clone()
    new, mask = sparsegpt_prune(w16, hessian, 0.5)
    assert new.dtype == torch.bfloat16 and mask.dtype == torch.bool and mask.shape == w.shape
    assert torch.equal(hessian, h_before)
    assert torch.equal(w16, w.bfloat16())


def test_sparsegpt_retries_with_more_damping_when_cholesky_fails(caplog):
    hessian = torch.eye(8)
    hessian[0, 1] = hessian[1, 0] = 2.0  # eigenvalue -1: indefinite until the damping exceeds 1
    w = torch.randn(4, 8, generator=seeded(30))
    with caplog.at_level(logging.WARNING, logger="neuroal.pruning.sparsegpt"):
        new, mask = sparsegpt_prune(w, hessian, 0.5)
    assert torch.isfinite(new).all()
    assert "retrying" in caplog.text
