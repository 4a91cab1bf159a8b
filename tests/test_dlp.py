"""DLP (`--top-up dlp`): the math against a transcription of the authors' code, the allocation on a
tiny dense model against an independent computation, and the CLI on every family."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from conftest import FAMILIES, SMOLLM2_VOCAB, input_norms_by_whole_model_hooks
from neuroal.cli import main
from neuroal.models import block_matrices, decoder_blocks, load_model, prunable_matrices, resolve_model
from neuroal.pruning.allocators.dlp import ALLOCATOR, Options
from neuroal.pruning.allocators.dlp.math import (
    MIN_SPARSITY,
    block_importance,
    block_unimportance,
    dlp_sparsities,
)
from neuroal.pruning.methods.wanda import METHOD as WANDA
from neuroal.pruning.plugin import AllocationInputs
from neuroal.pruning.registry import allocator

CPU = torch.device("cpu")


def dlp_by_hand(block_scores, sparsity_ratio, alpha, strategy="median"):
    """Transcription of the authors' get_dlp_ratios (ironartisan/DLP lib/prune.py), from the
    pooled block scores on, followed by prune_wanda_dlp's `1 - imp_ratio[i]` and its floor."""
    layer_score = {}
    for i, layer_wmetric in enumerate(block_scores):
        layer_wmetric = torch.cat([torch.flatten(x.cpu()) for x in layer_wmetric])
        if strategy == "median":
            strategy_score = torch.median(layer_wmetric.float())
        elif strategy == "mean":
            strategy_score = torch.mean(layer_wmetric.float())
        elif strategy == "std":
            strategy_score = torch.std(layer_wmetric.float())
        layer_score[i] = torch.sum(torch.abs(strategy_score))
    total_conn = sum(layer_score.values())
    ratio_conn = {layer: 1 - (layer_score[layer] / total_conn) for layer in layer_score}
    imp_ratios = torch.tensor(list(ratio_conn.values()))
    min_ratio, max_ratio = torch.min(imp_ratios), torch.max(imp_ratios)
    scaled_ratios = (imp_ratios - min_ratio) * (1 / (max_ratio - min_ratio) * alpha * 2)
    all_layer_ratio = (scaled_ratios - torch.mean(scaled_ratios) + (1 - sparsity_ratio)).tolist()
    sparsities = [1 - r for r in all_layer_ratio]
    return [0.01 if s <= 0 else s for s in sparsities]


def random_blocks(n_blocks=5, seed=0):
    """Wanda-like score matrices, three modules a block, with medians that differ by block."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(6, 4), (4, 7), (5, 5)]
    return [[torch.rand(shape, generator=g) * (1 + b) ** 0.5 * torch.rand(1, generator=g) for shape in shapes]
            for b in range(n_blocks)]


# ------------------------------------------------------------------------------------ the math


@pytest.mark.parametrize("strategy", ["median", "mean", "std"])
@pytest.mark.parametrize("sparsity,alpha", [(0.5, 0.15), (0.7, 0.15), (0.6, 0.05)])
def test_sparsities_follow_the_authors_code(sparsity, alpha, strategy):
    blocks = random_blocks()
    ours = dlp_sparsities([block_unimportance(b, strategy) for b in blocks], sparsity, alpha)
    # the authors compute in float32, we in float64
    assert ours == pytest.approx(dlp_by_hand(blocks, sparsity, alpha, strategy), abs=1e-6)


def test_unimportance_is_the_lower_median_of_the_pooled_block():
    a = torch.tensor([[1.0, 2.0], [3.0, 100.0]])
    b = torch.tensor([[0.5, 0.25]])
    # By hand: pooled sorted 0.25, 0.5, 1, 2, 3, 100; six entries, torch's lower median is the 3rd.
    # (The mean of the per-module medians would be (2 + 0.25) / 2.)
    assert block_unimportance([a, b]) == 1.0
    assert block_unimportance([a, b], "mean") == pytest.approx(106.75 / 6)
    assert block_unimportance([a, b], "max") == 100.0


def test_importance_is_one_minus_the_share_of_unimportance():
    assert block_importance([1.0, 3.0]) == [0.75, 0.25]
    assert block_importance([0.0, 0.0]) == [1.0, 1.0]


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_mean_is_the_target_and_important_blocks_are_pruned_less(sparsity):
    unimportance = [0.8, 0.3, 1.1, 0.5, 0.9]
    result = dlp_sparsities(unimportance, sparsity, alpha=0.15)
    assert sum(result) / len(result) == pytest.approx(sparsity, abs=1e-12)
    assert max(result) - min(result) == pytest.approx(2 * 0.15, abs=1e-12)
    importance = block_importance(unimportance)
    order_by_importance = sorted(range(5), key=lambda i: importance[i])
    assert sorted(range(5), key=lambda i: -result[i]) == order_by_importance  # least important, most pruned


def test_closed_form():
    """The normalisation by the total cancels: s_i = s + 2 alpha (u_i - mean u) / (max u - min u)."""
    u = [2.0, 5.0, 3.0, 4.5]
    mean = sum(u) / len(u)
    expected = [0.6 + 2 * 0.1 * (x - mean) / (max(u) - min(u)) for x in u]
    assert dlp_sparsities(u, 0.6, alpha=0.1) == pytest.approx(expected, abs=1e-12)
    assert dlp_sparsities([10 * x for x in u], 0.6, alpha=0.1) == pytest.approx(expected, abs=1e-12)


def test_equal_blocks_or_zero_alpha_give_the_target():
    assert dlp_sparsities([0.4, 0.4, 0.4], 0.6) == pytest.approx([0.6] * 3, abs=1e-12)
    assert dlp_sparsities([0.0, 0.0], 0.6) == pytest.approx([0.6] * 2, abs=1e-12)
    assert dlp_sparsities([0.1, 0.9, 0.4], 0.6, alpha=0.0) == pytest.approx([0.6] * 3, abs=1e-12)


def test_floor_and_cap_are_logged(caplog):
    with caplog.at_level(logging.WARNING):
        low = dlp_sparsities([0.0, 1.0], 0.1, alpha=0.2)  # 0.1 -+ 0.2
        high = dlp_sparsities([0.0, 1.0], 0.9, alpha=0.2)  # 0.9 -+ 0.2
    assert low == pytest.approx([MIN_SPARSITY, 0.3])
    assert high == pytest.approx([0.7, 0.99])
    assert caplog.text.count("clamped") == 2


def test_bad_arguments():
    with pytest.raises(ValueError):
        dlp_sparsities([], 0.5)
    with pytest.raises(ValueError):
        dlp_sparsities([1.0], 1.0)
    with pytest.raises(ValueError):
        block_unimportance([torch.ones(2)], "mode")


# ------------------------------------------------------------------------- on a tiny dense model

IDS = torch.randint(0, SMOLLM2_VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))


def test_allocate_on_the_dense_model(tiny_llama):
    model, _ = load_model(resolve_model(str(tiny_llama)))
    before = {n: lin.weight.clone() for n, lin in prunable_matrices(model).items()}
    inputs = AllocationInputs(model, prunable_matrices(model), 0.6, WANDA, CPU, batch_size=2, calibration_ids=IDS)
    allocation = allocator("dlp").allocate(inputs, Options())

    norms = input_norms_by_whole_model_hooks(model, IDS)
    expected = []
    for index, block in enumerate(decoder_blocks(model)):
        prefix = f"model.layers.{index}"
        scores = [lin.weight.abs() * norms[f"{prefix}.{n}"] for n, lin in block_matrices(block).items()]
        expected.append(torch.median(torch.cat([s.flatten() for s in scores])).item())
    assert allocation.details["block_unimportance"] == pytest.approx(expected, rel=1e-5)
    sparsities = allocation.details["block_sparsities"]
    assert sparsities == pytest.approx(dlp_sparsities(expected, 0.6), abs=1e-5)
    assert sum(sparsities) / len(sparsities) == pytest.approx(0.6, abs=1e-12)
    assert allocation.targets.keys() == before.keys()
    for name, target in allocation.targets.items():
        assert target == sparsities[int(name.split(".")[2])]
    assert all(torch.equal(lin.weight, before[n]) for n, lin in prunable_matrices(model).items())  # dense left dense


def test_allocator_declares_what_it_reads():
    assert ALLOCATOR.reads_data and ALLOCATOR.name == "dlp"
    assert Options().alpha == 0.15 and Options().strategy == "median"


# ------------------------------------------------------------------------------------- the CLI


def prune_cli(model, out, *extra) -> int:
    return main(["prune", "--model", str(model), "--method", "wanda", "--top-up", "dlp", "--sparsity", "0.6",
                 "--calib", "lee", "--nsamples", "4", "--seqlen", "32", "--out", str(out), *extra])


def achieved_sparsity(folder) -> float:
    from transformers import AutoModelForCausalLM

    linears = prunable_matrices(AutoModelForCausalLM.from_pretrained(folder))
    zeros = sum(int((lin.weight == 0).sum()) for lin in linears.values())
    return zeros / sum(lin.weight.numel() for lin in linears.values())


def floor_count_sparsity(model_folder, block_sparsities) -> float:
    """The sparsity that pruning ``floor(s_b * in)`` weights of every row (the authors' ``int()``)
    gives with these block sparsities: the allocation's mean is exact, only this rounding is lost."""
    model, _ = load_model(resolve_model(str(model_folder)))
    zeros = total = 0
    for s, block in zip(block_sparsities, decoder_blocks(model)):
        for lin in block_matrices(block).values():
            zeros += lin.out_features * math.floor(s * lin.in_features)
            total += lin.weight.numel()
    return zeros / total


def test_cli_reaches_the_target(tiny_llama, tmp_path):
    from neuroal.checkpoint import read_manifest

    assert prune_cli(tiny_llama, tmp_path / "out") == 0
    details = read_manifest(tmp_path / "out").allocation
    sparsities, importance = details["block_sparsities"], details["block_importance"]
    assert sum(sparsities) / len(sparsities) == pytest.approx(0.6, abs=1e-12)
    assert max(sparsities) - min(sparsities) == pytest.approx(0.3, abs=1e-9)
    assert sorted(range(3), key=lambda i: sparsities[i]) == sorted(range(3), key=lambda i: -importance[i])
    achieved = achieved_sparsity(tmp_path / "out")
    assert achieved == pytest.approx(floor_count_sparsity(tiny_llama, sparsities), abs=1e-12)
    # The per-row floor loses under one weight a row: up to 1/64 on this model's 64-wide rows, and
    # here 0.0104 (0.5896 achieved; uniform Wanda gets 0.5938), so 0.01 is out of reach on it.
    assert achieved == pytest.approx(0.6, abs=1 / 64)


def test_cli_options(tiny_llama, tmp_path):
    from neuroal.checkpoint import read_manifest

    assert prune_cli(tiny_llama, tmp_path / "out", "--dlp-alpha", "0.05", "--dlp-strategy", "mean") == 0
    sparsities = read_manifest(tmp_path / "out").allocation["block_sparsities"]
    assert max(sparsities) - min(sparsities) == pytest.approx(0.1, abs=1e-9)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family(family_folders, family, tmp_path):
    from neuroal.checkpoint import read_manifest

    assert prune_cli(family_folders[family], tmp_path / "out") == 0
    achieved = achieved_sparsity(tmp_path / "out")
    assert achieved == pytest.approx(0.6, abs=0.01)
    sparsities = read_manifest(tmp_path / "out").allocation["block_sparsities"]
    assert achieved == pytest.approx(floor_count_sparsity(family_folders[family], sparsities), abs=1e-12)
