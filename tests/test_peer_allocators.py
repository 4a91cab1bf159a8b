"""OWL and AlphaPruning allocation math, checked against counts and formulas written out here;
OWL's two variants on a tiny dense model."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import SMOLLM2_VOCAB, input_norms_by_whole_model_hooks

from neuroal.models import load_model, prunable_matrices, resolve_model
from neuroal.pruning.allocation import expand_to_modules
from neuroal.pruning.allocators.alpha.math import alpha_peak, alpha_ratios, alpha_sparsities, block_alpha
from neuroal.pruning.allocators.owl import Options as OwlOptions
from neuroal.pruning.allocators.owl.math import outlier_ratio, owl_sparsities
from neuroal.pruning.methods.wanda import METHOD as WANDA
from neuroal.pruning.plugin import AllocationInputs
from neuroal.pruning.registry import allocator


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread for this module: on the busy 2-core machine a 576x576 SVD took ~0.03 s with
    one thread and up to ~9 s with two (thread contention), which is what made these tests slow."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

# ---------------------------------------------------------------------------------------- OWL


def test_outlier_ratio_pools_the_whole_block():
    a = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 40.0]])
    b = torch.tensor([[0.1] * 9 + [2.0]])
    # By hand: 16 entries summing to 45 + 2.9 = 47.9, mean 2.99375, threshold 5x = 14.96875;
    # only the 40 is above it. (Per module, b's own mean 0.29 would make its 2.0 an outlier too.)
    assert outlier_ratio([a, b]) == pytest.approx(1 / 16, abs=0)
    assert outlier_ratio([b]) == pytest.approx(1 / 10, abs=0)


def test_outlier_ratio_counts_strictly_greater_and_takes_m():
    entries = [1.0, 1.0, 1.0, 1.0, 2.0, 6.0]  # mean 2: 2x mean = 4, 3x mean = 6
    scores = [torch.tensor(entries[:4]).view(2, 2), torch.tensor(entries[4:]).view(1, 2)]
    mean = sum(entries) / len(entries)
    for m in (2.0, 3.0):
        by_hand = sum(1 for x in entries if x > m * mean) / len(entries)
        assert outlier_ratio(scores, m=m) == by_hand
    assert outlier_ratio(scores, m=3.0) == 0.0  # 6 is not strictly above 6


def test_outlier_ratio_on_random_scores_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    scores = [torch.rand(7, 5, generator=g) ** 8 * 50, torch.rand(3, 11, generator=g) ** 8]
    flat = [x for s in scores for x in s.flatten().tolist()]
    mean = sum(flat) / len(flat)
    expected = sum(1 for x in flat if x > 5 * mean) / len(flat)
    assert expected > 0
    assert outlier_ratio(scores) == pytest.approx(expected, abs=0)


def owl_by_hand(ratios, sparsity, lam):
    """Transcription of the authors' prune_wanda_outlier (luuyin/OWL lib/prune_all.py)."""
    low, high = min(ratios), max(ratios)
    mapped = [(r - low) * (1 / (high - low) * lam * 2) for r in ratios]
    mean = sum(mapped) / len(mapped)
    density = [x - mean + (1 - sparsity) for x in mapped]
    return [1 - d for d in density]


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_owl_sparsities_follow_the_authors_formula(sparsity):
    ratios = [1.2, 3.5, 0.4, 2.0, 0.9]
    result = owl_sparsities(ratios, sparsity, lam=0.08)
    assert result == pytest.approx(owl_by_hand(ratios, sparsity, 0.08), abs=1e-12)
    assert sum(result) / len(result) == pytest.approx(sparsity, abs=1e-12)
    assert result.index(min(result)) == ratios.index(max(ratios))  # most outliers, least pruned
    assert result.index(max(result)) == ratios.index(min(ratios))
    assert max(result) - min(result) == pytest.approx(2 * 0.08, abs=1e-12)


def test_owl_is_scale_free_so_percent_and_fraction_agree():
    ratios = [0.012, 0.031, 0.007]
    assert owl_sparsities(ratios, 0.7) == pytest.approx(owl_sparsities([100 * r for r in ratios], 0.7), abs=1e-12)


def test_owl_equal_ratios_are_uniform():
    assert owl_sparsities([2.0, 2.0, 2.0], 0.6) == pytest.approx([0.6, 0.6, 0.6], abs=1e-12)
    assert owl_sparsities([0.3], 0.5) == pytest.approx([0.5], abs=1e-12)


def test_owl_clamps_like_the_authors():
    result = owl_sparsities([0.0, 1.0], 0.05, lam=0.08)  # by the formula: 0.13 and -0.03
    assert result == pytest.approx([0.13, 0.01], abs=1e-12)  # a sparsity <= 0 becomes 0.01


def test_expand_to_modules():
    names = [["model.layers.0.a", "model.layers.0.b"], ["model.layers.1.a"]]
    assert expand_to_modules([0.4, 0.6], names) == {
        "model.layers.0.a": 0.4,
        "model.layers.0.b": 0.4,
        "model.layers.1.a": 0.6,
    }
    with pytest.raises(ValueError):
        expand_to_modules([0.4], names)
    with pytest.raises(ValueError):
        expand_to_modules([0.4, 0.6], [["x"], ["x"]])


# OWL on a tiny dense model: the variant it ran is recorded; block (the authors' code) is the default.

OWL_IDS = torch.randint(0, SMOLLM2_VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def owl_on_tiny_llama(tiny_llama):
    """The dense model's Wanda scores by matrix (computed here with whole-model hooks) and OWL's
    allocations at 60%: default options, and each variant named."""
    model, _ = load_model(resolve_model(str(tiny_llama)))
    matrices = prunable_matrices(model)
    norms = input_norms_by_whole_model_hooks(model, OWL_IDS)
    scores = {name: m.weight.detach().abs() * norms[name] for name, m in matrices.items()}
    inputs = AllocationInputs(model, matrices, 0.6, WANDA, torch.device("cpu"), batch_size=2, calibration_ids=OWL_IDS)
    owl = allocator("owl").allocate
    runs = {"default": owl(inputs), **{v: owl(inputs, OwlOptions(variant=v)) for v in ("block", "layer")}}
    return scores, {name: m.weight.numel() for name, m in matrices.items()}, runs


def by_weight(targets, sizes):
    return sum(targets[n] * sizes[n] for n in targets) / sum(sizes.values())


def test_owl_records_the_block_variant_by_default_and_its_allocation_is_unchanged(owl_on_tiny_llama):
    scores, sizes, runs = owl_on_tiny_llama
    assert OwlOptions().variant == "block"
    default, block = runs["default"], runs["block"]
    assert default.details["variant"] == "block" and default.details == block.details
    assert default.targets == block.targets
    blocks = [[n for n in scores if n.startswith(f"model.layers.{i}.")] for i in range(3)]
    # atol: a score a float32 rounding away from the threshold may count on one side or the other
    expected = [outlier_ratio([scores[n] for n in names]) for names in blocks]
    assert default.details["outlier_ratios"] == pytest.approx(expected, abs=2 / min(sizes.values()))
    sparsities = default.details["block_sparsities"]
    assert sparsities == pytest.approx(owl_sparsities(default.details["outlier_ratios"], 0.6), abs=1e-12)
    assert default.targets == expand_to_modules(sparsities, blocks)


def test_owl_layer_variant_gives_each_matrix_its_own_ratio_and_sparsity(owl_on_tiny_llama):
    scores, sizes, runs = owl_on_tiny_llama
    layer, block = runs["layer"], runs["block"]
    assert layer.details["variant"] == "layer" and "block_sparsities" not in layer.details
    ratios = layer.details["outlier_ratios"]
    assert list(ratios) == list(scores) == list(layer.targets)
    expected = {name: outlier_ratio([score]) for name, score in scores.items()}
    for name, ratio in ratios.items():
        assert ratio == pytest.approx(expected[name], abs=2 / sizes[name]), name
    # min-max over every matrix onto 2 * lambda, then one shift puts the mean by weight at the target
    spread = [layer.targets[n] - s for n, s in zip(scores, owl_sparsities(list(ratios.values()), 0.6))]
    assert max(spread) - min(spread) == pytest.approx(0, abs=1e-12)
    assert by_weight(layer.targets, sizes) == pytest.approx(0.6, abs=1e-12)
    assert by_weight(block.targets, sizes) == pytest.approx(0.6, abs=1e-12)
    first_block = [layer.targets[n] for n in scores if n.startswith("model.layers.0.")]
    assert len(set(first_block)) > 1  # matrices of one block differ, unlike the block variant
    assert layer.targets != block.targets


def test_owl_variant_is_an_option_with_choices():
    assert OwlOptions(variant="layer").variant == "layer"
    with pytest.raises(ValueError):
        OwlOptions(variant="row")


# ---------------------------------------------------------------------------------- AlphaPruning


def net_esd_alpha_peak(weight, bins=100):
    """Transcription of the authors' net_esd_estimator(fix_fingers='xmin_peak') for one weight
    (haiquanlu/AlphaPruning lib/esd_utils.py, filter_zeros=False)."""
    matrix = weight.clone().cpu().to(torch.float32)
    eigs = torch.square(torch.linalg.svdvals(matrix).flatten())
    eigs, _ = torch.sort(eigs, descending=False)
    nz_eigs = eigs
    N = len(nz_eigs)
    log_nz_eigs = torch.log(nz_eigs)
    alphas = torch.zeros(N - 1)
    Ds = torch.ones(N - 1)
    hist_nz_eigs = torch.log10(nz_eigs)
    min_e, max_e = hist_nz_eigs.min(), hist_nz_eigs.max()
    counts = torch.histc(hist_nz_eigs, bins, min=min_e, max=max_e)
    boundaries = torch.linspace(min_e, max_e, bins + 1)
    ih = torch.argmax(counts)
    xmin2 = 10 ** boundaries[ih]
    xmin_min = torch.log10(0.95 * xmin2)
    xmin_max = 1.5 * xmin2
    for i, xmin in enumerate(nz_eigs[:-1]):
        if xmin < xmin_min:
            continue
        if xmin > xmin_max:
            break
        n = float(N - i)
        seq = torch.arange(n)
        alpha = 1 + n / (torch.sum(log_nz_eigs[i:]) - n * log_nz_eigs[i])
        alphas[i] = alpha
        if alpha > 1:
            Ds[i] = torch.max(torch.abs(1 - (nz_eigs[i:] / xmin) ** (-alpha + 1) - seq / n))
    return alphas[torch.argmin(Ds)].item()


def orthonormal(n, k, generator):
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q[:, :k]


def power_law_weight(rows, cols, exponent, seed=0):
    """``W = U diag(sqrt(lambda)) V^T`` with the eigenvalues ``lambda`` of ``W^T W`` drawn from a
    Pareto law of density ``p(lambda) ~ lambda ** -exponent`` for ``lambda >= 1e-3``."""
    g = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    u = torch.rand(k, generator=g, dtype=torch.float64)
    eigenvalues = 1e-3 * (1 - u) ** (-1 / (exponent - 1))  # inverse CDF of that Pareto law
    w = (orthonormal(rows, k, g) * eigenvalues.sqrt()) @ orthonormal(cols, k, g).T
    return w.to(torch.float32)


@pytest.mark.parametrize("shape", [(96, 40), (40, 96), (64, 64)])
def test_alpha_peak_matches_the_authors_estimator(shape):
    g = torch.Generator().manual_seed(3)
    for w in (torch.randn(*shape, generator=g) * 0.02, power_law_weight(*shape, 3.0, seed=1)):
        assert alpha_peak(w) == net_esd_alpha_peak(w)
        assert alpha_peak(w.to(torch.bfloat16)) == net_esd_alpha_peak(w.to(torch.bfloat16))


@pytest.mark.parametrize("exponent", [2.5, 4.0])
def test_alpha_peak_recovers_a_known_power_law(exponent):
    estimate = alpha_peak(power_law_weight(576, 576, exponent))
    assert abs(estimate - exponent) / exponent < 0.15


def test_heavier_tail_gets_lower_alpha():
    heavy, light = power_law_weight(576, 576, 2.2, seed=4), power_law_weight(576, 576, 4.5, seed=4)
    assert alpha_peak(heavy) < alpha_peak(light)
    assert block_alpha([heavy, light]) == pytest.approx((alpha_peak(heavy) + alpha_peak(light)) / 2)


def test_alpha_peak_rejects_bad_weights():
    with pytest.raises(ValueError):
        alpha_peak(torch.zeros(8, 8))
    with pytest.raises(ValueError):
        alpha_peak(torch.ones(1, 8))


def ww_sparsity_by_hand(alphas, params, sparsity, eps):
    """Transcription of the authors' ww_sparsity (haiquanlu/AlphaPruning lib/prune.py) per block."""
    s1, s2 = 1 - eps, 1 + eps
    low, high = min(alphas), max(alphas)
    ratios = [(a - low) / (high - low) * (s2 - s1) + s1 for a in alphas]
    scaler = sum(params) * sparsity / sum(p * r for p, r in zip(params, ratios))
    return [r * scaler for r in ratios]


def weighted_mean(values, weights):
    return sum(v * w for v, w in zip(values, weights)) / sum(weights)


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_alpha_sparsities_follow_the_authors_formula(sparsity):
    alphas = [3.1, 4.7, 2.6, 5.9, 3.8]
    params = [1000, 1000, 1500, 2000, 2500]
    assert max(ww_sparsity_by_hand(alphas, params, sparsity, 0.3)) < 0.99  # the cap does not bite
    result = alpha_sparsities(alphas, params, sparsity, eps=0.3)
    assert result == pytest.approx(ww_sparsity_by_hand(alphas, params, sparsity, 0.3), abs=1e-12)
    assert weighted_mean(result, params) == pytest.approx(sparsity, abs=1e-9)
    order = sorted(range(len(alphas)), key=lambda i: alphas[i])
    assert all(result[i] < result[j] for i, j in zip(order, order[1:]))  # higher alpha, more pruned


def test_alpha_range_before_rescaling_respects_eps():
    alphas, s, eps = [3.1, 4.7, 2.6, 5.9, 3.8], 0.6, 0.3
    prescaled = [s * r for r in alpha_ratios(alphas, eps)]
    assert min(prescaled) == pytest.approx(s * (1 - eps), abs=1e-12)
    assert max(prescaled) == pytest.approx(s * (1 + eps), abs=1e-12)
    assert prescaled[alphas.index(min(alphas))] == pytest.approx(s * (1 - eps), abs=1e-12)
    expected = [s * ((a - 2.6) / (5.9 - 2.6) * 2 * eps + 1 - eps) for a in alphas]
    assert prescaled == pytest.approx(expected, abs=1e-12)


def test_alpha_equal_alphas_are_uniform():
    assert alpha_sparsities([4.0, 4.0, 4.0], [10, 20, 30], 0.7) == pytest.approx([0.7] * 3, abs=1e-12)


def test_alpha_sparsities_cap_keeps_the_weighted_mean():
    alphas, params, s = [2.0, 2.0, 2.0, 9.0], [1000, 1000, 1000, 10], 0.75
    uncapped = ww_sparsity_by_hand(alphas, params, s, 0.3)
    assert max(uncapped) > 0.99  # the authors would prune the last block almost or fully away
    result = alpha_sparsities(alphas, params, s, eps=0.3)
    assert max(result) == pytest.approx(0.99, abs=1e-12)
    assert all(0 <= x < 1 for x in result)
    assert weighted_mean(result, params) == pytest.approx(s, abs=1e-9)
    assert result[3] > result[0]


@pytest.mark.parametrize("seed", range(5))
def test_alpha_sparsities_random_blocks(seed):
    g = torch.Generator().manual_seed(seed)
    alphas = (2 + 6 * torch.rand(30, generator=g)).tolist()
    params = torch.randint(1000, 100000, (30,), generator=g).tolist()
    result = alpha_sparsities(alphas, params, 0.7, eps=0.3)
    assert weighted_mean(result, params) == pytest.approx(0.7, abs=1e-9)
    assert all(0 < x < 1 for x in result)
    assert not any(math.isnan(x) for x in result)
