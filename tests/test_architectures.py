"""Every family of the architecture table (and two outside it) prunes end to end: the replay is
exact per block (each block gets the mask and rotary embedding of its own layer type), the saved weights reach the target, the checkpoint reloads and gives finite logits."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from conftest import FAMILIES, SMOLLM2_VOCAB, input_norms_by_whole_model_hooks
from neuroal.cli import main
from neuroal.models import architecture_of, decoder_blocks, load_model, prunable_matrices, resolve_model
from neuroal.pruning.layer_sequential import layer_sequential
from neuroal.pruning.statistics import NORMS
from neuroal.replay import capture_block_inputs, run_block

CPU = torch.device("cpu")


def final_norm(model):
    """The module applied after the last block (every family has exactly one final norm)."""
    base = model.get_submodule(architecture_of(model).blocks.rsplit(".", 1)[0])
    for name in ("norm", "final_layer_norm", "final_layernorm"):
        if hasattr(base, name):
            return getattr(base, name)
    raise AssertionError(f"no final norm in {type(model).__name__}")


SEQLEN = 32  # four times the tiny configs' sliding window of 8
IDS = torch.randint(0, SMOLLM2_VOCAB, (4, SEQLEN), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", FAMILIES)
def test_replay_is_exact(family_folders, family):
    model, _ = load_model(resolve_model(str(family_folders[family])))
    blocks = decoder_blocks(model)
    inputs = capture_block_inputs(model, blocks, IDS, CPU, batch_size=2)
    for block in blocks:
        inputs = run_block(block, inputs)
    with torch.no_grad():
        out = model(input_ids=IDS, output_hidden_states=True)
        replayed = final_norm(model)(torch.cat(inputs.hidden))
    assert (replayed - out.hidden_states[-1]).abs().max().item() == 0.0


def input_norms_by_runner(model, ids, batch_size) -> dict[str, torch.Tensor]:
    return {f"{step.prefix}.{name}": stats.norms()
            for step in layer_sequential(model, ids, CPU, batch_size, frozenset((NORMS,)))
            for name, stats in step.stats.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_runner_statistics_equal_whole_model_hooks(family_folders, family):
    model, _ = load_model(resolve_model(str(family_folders[family])))
    expected = input_norms_by_whole_model_hooks(model, IDS, batch_size=2)
    collected = input_norms_by_runner(model, IDS, batch_size=2)
    assert collected.keys() == expected.keys()
    for name, norms in expected.items():
        assert torch.allclose(collected[name], norms, rtol=1e-6, atol=0), name


@pytest.mark.parametrize("family", ["Gemma2ForCausalLM", "Gemma3ForCausalLM", "Qwen2ForCausalLM", "Cohere2ForCausalLM"])
def test_each_block_gets_the_arguments_of_its_own_layer_type(family_folders, family):
    """The configs above are sharp enough to tell: block 0's mask and rotary embedding replayed to
    block 1 (of the other layer type) change block 1's statistics."""
    model, _ = load_model(resolve_model(str(family_folders[family])))
    blocks = decoder_blocks(model)
    inputs = capture_block_inputs(model, blocks, IDS, CPU, batch_size=2)
    own = run_block(blocks[0], inputs)
    borrowed = dataclasses.replace(own, calls=[inputs.calls[0]] * len(blocks))
    assert not torch.equal(torch.cat(run_block(blocks[1], own).hidden), torch.cat(run_block(blocks[1], borrowed).hidden))


def test_replay_in_the_wrong_order_is_refused(family_folders):
    model, _ = load_model(resolve_model(str(family_folders["LlamaForCausalLM"])))
    blocks = decoder_blocks(model)
    inputs = capture_block_inputs(model, blocks, IDS, CPU, batch_size=2)
    with pytest.raises(RuntimeError, match="out of order"):
        run_block(blocks[1], inputs)


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_every_family(family_folders, family, tmp_path):
    out = tmp_path / "pruned"
    args = ["prune", "--model", str(family_folders[family]), "--method", "wanda", "--sparsity", "0.6",
            "--calib", "lee", "--nsamples", "4", "--seqlen", "32", "--out", str(out)]
    assert main(args) == 0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    for name, lin in prunable_matrices(model).items():
        zeros = (lin.weight == 0).sum(dim=1)
        assert torch.all(zeros == math.floor(0.6 * lin.in_features)), name
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits).all()


def saved_linears(folder):
    from transformers import AutoModelForCausalLM

    return prunable_matrices(AutoModelForCausalLM.from_pretrained(folder))


def prune_cli(model, out, method, top_up, sparsity, *extra) -> int:
    return main(["prune", "--model", str(model), "--method", method, "--top-up", top_up, "--sparsity", str(sparsity),
                 "--calib", "lee", "--nsamples", "4", "--seqlen", "32", "--out", str(out), *extra])


@pytest.mark.parametrize("top_up", ["uniform", "owl", "alpha", "dsnot"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "multiflow", "sparsegpt"])
def test_every_method_and_top_up(tiny_llama, tmp_path, method, top_up):
    from neuroal.checkpoint import read_manifest

    assert prune_cli(tiny_llama, tmp_path / "out", method, top_up, 0.6) == 0
    linears = saved_linears(tmp_path / "out")
    zeros = sum(int((lin.weight == 0).sum()) for lin in linears.values())
    total = sum(lin.weight.numel() for lin in linears.values())
    # floor(s * in) per row loses up to one weight a row (1/64 here); sparsegpt prunes a few more
    assert zeros / total == pytest.approx(0.6, abs=1 / min(lin.in_features for lin in linears.values()))
    manifest = read_manifest(tmp_path / "out")
    per_module = manifest.module_sparsity
    if top_up in ("owl", "alpha"):
        assert len({round(s, 2) for s in per_module.values()}) > 1  # not uniform
    if top_up in ("uniform", "dsnot") and method != "sparsegpt":  # every row at floor(s * in)
        for lin in linears.values():
            assert torch.all((lin.weight == 0).sum(dim=1) == math.floor(0.6 * lin.in_features))


@pytest.mark.parametrize("top_up", ["uniform", "dsnot"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "multiflow", "sparsegpt"])
def test_n_m_structure(tiny_llama, tmp_path, method, top_up):
    assert prune_cli(tiny_llama, tmp_path / "out", method, top_up, 0.5, "--structure", "2:4") == 0
    for name, lin in saved_linears(tmp_path / "out").items():
        groups = (lin.weight == 0).reshape(lin.out_features, -1, 4).sum(dim=-1)
        assert torch.all(groups == 2), name
