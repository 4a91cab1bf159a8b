"""Scores, masks and the layer-sequential wiring, checked against the formulas written out here."""

from __future__ import annotations

import math

import pytest
import torch

from neuroal.replay import capture_block_inputs, run_block
from neuroal.errors import UserError
from neuroal.models import block_matrices, decoder_blocks, load_model, prunable_matrices, resolve_model
from neuroal.pruning import allocator, base_method, prune_model, sparsity_report
from neuroal.pruning.masks import (
    SAME_WIDTH_INT,
    kept_only,
    lowest,
    mask_from_ranks,
    per_row_mask,
    row_mask,
    row_ranks,
    zero_,
)
from neuroal.pruning.methods.magnitude import magnitude_score
from neuroal.pruning.methods.wanda import wanda_score
from neuroal.pruning.layer_sequential import layer_sequential
from neuroal.pruning.statistics import NORMS

CPU = torch.device("cpu")


def lowest_per_row(scores: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Transcription: in row r, mark the counts[r] lowest scores; ties go to the lower index."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    for r, row in enumerate(scores.tolist()):
        order = sorted(range(len(row)), key=lambda j: (row[j], j))
        for j in order[: counts[r]]:
            mask[r, j] = True
    return mask


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.7, 0.99])
def test_row_mask_prunes_floor_s_in_lowest(sparsity):
    scores = torch.randn(6, 23, generator=torch.Generator().manual_seed(1)).abs()
    scores[0, :5] = 0.5  # ties are broken by position
    expected = lowest_per_row(scores, [math.floor(sparsity * 23)] * 6)
    assert torch.equal(row_mask(scores, sparsity), expected)


def test_per_row_mask_keeps_floor_density_in_highest():
    scores = torch.randn(4, 10, generator=torch.Generator().manual_seed(2))
    rows = torch.tensor([0.1, 0.5, 0.55, 0.99])
    keep = [math.floor((1 - s) * 10) for s in rows.tolist()]
    assert torch.equal(per_row_mask(scores, rows), lowest_per_row(scores, [10 - k for k in keep]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_selection_masks_equal_stable_sort_masks(dtype):
    # Coarse values force ties across every threshold; counts cover 0, full rows, one count for
    # all rows (selection) and per-row counts (sort).
    g = torch.Generator().manual_seed(4)
    scores = torch.randint(0, 7, (40, 33), generator=g).to(dtype)
    for counts in ([13] * 40, torch.randint(0, 34, (40,), generator=g).tolist(), [0] * 40, [33] * 40):
        expected = lowest_per_row(scores, counts)
        assert torch.equal(lowest(scores, torch.tensor(counts)), expected)
        assert torch.equal(mask_from_ranks(row_ranks(scores), torch.tensor(counts)), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_zeroing_writes_plus_zero_where_pruned_and_every_other_bit_as_it_was(dtype):
    # -0.0, NaN and infinities kept as they are; +0.0 (all bits clear) where pruned, as
    # torch.where with a +0.0 scalar writes. In place (the pruner) and out of place (a rebuild).
    weight = torch.tensor([[-0.0, float("nan"), float("inf"), 1.5], [-2.0, 0.0, -float("inf"), 3.0]], dtype=dtype)
    kept = torch.tensor([[True, True, True, False], [False, True, True, True]])
    bits = SAME_WIDTH_INT[weight.element_size()]
    expected = torch.where(kept, weight, torch.zeros((), dtype=dtype)).view(bits)
    assert torch.equal(kept_only(weight, kept).view(bits), expected)
    assert torch.equal(zero_(weight.clone(), ~kept).view(bits), expected)
    assert expected[0, 0] != 0 and expected[0, 3] == 0 and expected[1, 0] == 0  # -0.0 kept: a sign bit


def test_scores_match_formulas():
    w = torch.randn(3, 5)
    a = torch.rand(5)
    assert torch.equal(magnitude_score(w), w.abs())
    expected = torch.tensor([[abs(w[i, j].item()) * a[j].item() for j in range(5)] for i in range(3)])
    assert torch.allclose(wanda_score(w, a), expected)


def test_replay_reproduces_the_full_model_exactly(tiny_llama):
    model, _ = load_model(resolve_model(str(tiny_llama)))
    ids = torch.randint(0, 1000, (5, 16), generator=torch.Generator().manual_seed(0))
    blocks = decoder_blocks(model)
    inputs = capture_block_inputs(model, blocks, ids, CPU, batch_size=2)
    for block in blocks:
        inputs = run_block(block, inputs)
    replayed = model.model.norm(torch.cat(inputs.hidden))
    with torch.no_grad():
        full = model.model(input_ids=ids).last_hidden_state
    assert (replayed - full).abs().max().item() == 0.0


def test_input_norms_are_wanda_statistic(tiny_llama):
    model, _ = load_model(resolve_model(str(tiny_llama)))
    ids = torch.randint(0, 1000, (3, 8), generator=torch.Generator().manual_seed(0))
    blocks = decoder_blocks(model)
    inputs = capture_block_inputs(model, blocks, ids, CPU, batch_size=2)
    step = next(layer_sequential(model, ids, CPU, batch_size=2, kinds=frozenset((NORMS,))))
    norms = {name: stats.norms() for name, stats in step.stats.items()}
    with torch.no_grad():
        x = blocks[0].input_layernorm(torch.cat(inputs.hidden))  # q_proj's input, [samples, tokens, cols]
    expected = torch.sqrt(sum((x[s] ** 2).sum(dim=0) for s in range(3)) / 3)
    assert torch.allclose(norms["self_attn.q_proj"], expected, rtol=1e-5)


def uniform_targets(model, sparsity: float) -> dict:
    return {name: sparsity for name in prunable_matrices(model)}


def reference_wanda(model, ids: torch.Tensor, sparsity: float) -> None:
    """Transcription of layer-sequential Wanda: one sample at a time through the whole model, block i
    scored on the inputs that the pruned blocks before it produce, then pruned by the formula."""
    blocks = decoder_blocks(model)
    for block in blocks:
        linears = block_matrices(block)
        sq = {name: 0.0 for name in linears}

        def hook(name):
            def fn(_m, args, _out):
                sq[name] = sq[name] + (args[0][0].double() ** 2).sum(dim=0)

            return fn

        handles = [lin.owner.register_forward_hook(hook(n)) for n, lin in linears.items()]
        with torch.no_grad():
            for s in range(ids.shape[0]):
                model(input_ids=ids[s : s + 1])
        for h in handles:
            h.remove()
        for name, lin in linears.items():
            score = lin.weight.abs().double() * torch.sqrt(sq[name] / ids.shape[0]).unsqueeze(0)
            k = int(lin.weight.shape[1] * sparsity)
            with torch.no_grad():
                lin.weight[lowest_per_row(score, [k] * lin.weight.shape[0])] = 0


def test_layer_sequential_wanda_matches_transcription(tiny_llama):
    ids = torch.randint(0, 1000, (4, 12), generator=torch.Generator().manual_seed(3))
    fast, _ = load_model(resolve_model(str(tiny_llama)))
    slow, _ = load_model(resolve_model(str(tiny_llama)))
    prune_model(fast, base_method("wanda"), uniform_targets(fast, 0.5), ids, CPU, batch_size=3)
    reference_wanda(slow, ids, 0.5)
    for (name, a), b in zip(prunable_matrices(fast).items(), prunable_matrices(slow).values()):
        assert torch.equal(a.weight == 0, b.weight == 0), name


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_prune_reaches_target_in_every_row(tiny_llama, method):
    model, _ = load_model(resolve_model(str(tiny_llama)))
    dense = {n: lin.weight.clone() for n, lin in prunable_matrices(model).items()}
    ids = torch.randint(0, 1000, (4, 12), generator=torch.Generator().manual_seed(0))
    prune_model(model, base_method(method), uniform_targets(model, 0.5), ids, CPU)
    for name, lin in prunable_matrices(model).items():
        zeros_per_row = (lin.weight == 0).sum(dim=1)
        assert torch.all(zeros_per_row == lin.in_features // 2), name
        kept = lin.weight != 0
        assert torch.equal(lin.weight[kept], dense[name][kept])  # kept weights are untouched
    report = sparsity_report(model)
    assert report["achieved"] == pytest.approx(0.5) and set(report["modules"]) == set(dense)
    assert model.get_output_embeddings().weight.count_nonzero() == model.get_output_embeddings().weight.numel()


def test_unknown_and_unbuilt_choices_are_user_errors():
    with pytest.raises(UserError, match="unknown method"):
        base_method("random")
    with pytest.raises(UserError, match="unknown top-up"):
        allocator("magic")


def test_refinement_hits_attention_roles_and_regrows_original_values(tiny_llama):
    """An allocator's refinement runs on the modules of its roles only (DSnoT: attention), and a weight
    it regrows comes back with its dense value even after SparseGPT updated the kept weights."""
    from neuroal.pruning.allocators import uniform
    from neuroal.pruning.plugin import Allocator

    model, _ = load_model(resolve_model(str(tiny_llama)))
    dense = {n: lin.weight.clone() for n, lin in prunable_matrices(model).items()}
    regrown = {}  # id(weight) -> the (row, column) put back

    def regrow_one(weight, mask, stats, structure, options):
        column = int(mask[0].nonzero()[0])
        regrown[id(weight)] = (0, column)
        new = mask.clone()
        new[0, column] = False
        new[0, int((~mask[0]).nonzero()[0])] = True  # keep the row's count
        return new

    spy = Allocator("spy", "test", uniform.allocate, refine=regrow_one, refine_roles=("attn_in", "attn_out"))
    ids = torch.randint(0, 1000, (4, 16), generator=torch.Generator().manual_seed(0))
    prune_model(model, base_method("sparsegpt"), uniform_targets(model, 0.5), ids, CPU, allocator=spy)
    linears = prunable_matrices(model)
    attention = {n for n in linears if ".self_attn." in n}
    assert set(regrown) == {id(linears[n].weight) for n in attention}
    for name in attention:
        row, column = regrown[id(linears[name].weight)]
        assert linears[name].weight[row, column] == dense[name][row, column] != 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sequential_onloading_keeps_the_model_home():
    """Blocks visit the GPU one at a time: the model ends on the CPU, the device never held all of
    it at once, and the masks agree with a CPU prune."""
    from transformers import AutoModelForCausalLM

    from conftest import tiny_llama_config

    config = tiny_llama_config(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=8)
    cuda = torch.device("cuda")
    ids = torch.randint(0, 128, (4, 64), generator=torch.Generator().manual_seed(0))
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(AutoModelForCausalLM.from_config(config).eval())
    on_gpu, on_cpu = models
    model_bytes = sum(p.numel() * p.element_size() for p in on_gpu.parameters())
    torch.cuda.reset_peak_memory_stats(cuda)
    prune_model(on_gpu, base_method("wanda"), uniform_targets(on_gpu, 0.5), ids, cuda)
    prune_model(on_cpu, base_method("wanda"), uniform_targets(on_cpu, 0.5), ids, CPU)
    assert all(p.device.type == "cpu" for p in on_gpu.parameters())
    assert torch.cuda.max_memory_allocated(cuda) < model_bytes / 2  # 8 blocks, about one at a time
    for a, b in zip(prunable_matrices(on_gpu).values(), prunable_matrices(on_cpu).values()):
        assert ((a.weight == 0) == (b.weight == 0)).float().mean() > 0.99
