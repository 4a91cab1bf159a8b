"""Mixture-of-experts models, whose experts transformers 5 fuses into 3-D tensors: every expert is a
prunable matrix with statistics from the tokens routed to it (checked against the model's own
eager experts forward), every base method x top-up reaches its target counted from the saved
safetensors with every expert pruned, routers stay dense, an expert no token reaches falls back to
magnitude, and a weight the pruner cannot handle is refused."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from conftest import (
    MOE_FAMILIES,
    SMOLLM2_VOCAB,
    ExpertProducts,
    input_norms_by_whole_model_hooks,
    save_tiny_model,
    storage_key,
    tiny_moe_configs,
)
from neuroal.cli import main
from neuroal.models import block_matrices, decoder_blocks, load_model, prunable_matrices, resolve_model
from neuroal.pruning.layer_sequential import layer_sequential
from neuroal.pruning.registry import ALLOCATOR_NAMES, METHOD_NAMES
from neuroal.pruning.statistics import HESSIAN, MOMENTS, NORMS, InputStats
from neuroal.routed import Routed

CPU = torch.device("cpu")
IDS = torch.randint(0, SMOLLM2_VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
SPARSITY = 0.6
ROUTER = re.compile(r"\.(gate|router|shared_expert_gate)\.weight$")


@pytest.fixture(scope="module")
def moe_folders(tmp_path_factory, tokenizer) -> dict:
    configs = tiny_moe_configs(vocab_size=SMOLLM2_VOCAB)
    return {f: save_tiny_model(c, tokenizer, tmp_path_factory.mktemp(f)) for f, c in configs.items()}


def load(folder):
    return load_model(resolve_model(str(folder)))[0]


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_every_expert_is_a_matrix_and_routers_are_not(moe_folders, family):
    model = load(moe_folders[family])
    for index, block in enumerate(decoder_blocks(model)):
        names = set(block_matrices(block))
        experts = getattr(block.mlp, "experts", None)
        if experts is None:  # Qwen2-MoE's dense first block
            assert {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"} <= names
            continue
        count = experts.down_proj.shape[0]
        assert {f"mlp.experts.{t}.{e}" for t in ("gate_up_proj", "down_proj") for e in range(count)} <= names
        assert not any(re.search(r"(^|\.)(gate|router|shared_expert_gate)$", n) for n in names), names


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_expert_statistics_equal_the_models_own_forward(moe_folders, family):
    """Each expert's input norms (its routed tokens, and its down projection's activated
    intermediate) equal those recorded from the model's eager experts forward."""
    model = load(moe_folders[family])
    expected = input_norms_by_whole_model_hooks(model, IDS, batch_size=2)
    steps = list(layer_sequential(model, IDS, CPU, 2, frozenset((NORMS,))))
    collected = {f"{s.prefix}.{n}": stats for s in steps for n, stats in s.stats.items()}
    assert collected.keys() == expected.keys()
    for name, norms in expected.items():
        assert torch.allclose(collected[name].norms(), norms, rtol=1e-5, atol=1e-7), name
    routed = [s.ntokens for n, s in collected.items() if ".experts." in n and "gate_up" in n]
    top_k = model.config.num_experts_per_tok
    assert sum(routed) == top_k * IDS.numel() * sum(1 for s in steps if any(".experts." in n for n in s.stats))


def test_expert_hessians_are_those_of_their_routed_tokens(moe_folders):
    """SparseGPT's Hessian of every expert matrix is ``2 / samples * X^T X`` over the rows the
    model's eager experts forward multiplies by that expert's slice (GPT-OSS: transposed, biased)."""
    model = load(moe_folders["GptOssForCausalLM"])
    matrices = prunable_matrices(model)
    inputs: dict[str, list] = {}
    slices = {storage_key(getattr(m.owner, m.param)[m.expert]): n for n, m in matrices.items() if m.expert is not None}
    model.set_experts_implementation("eager")
    with torch.no_grad(), ExpertProducts(slices, lambda name, x: inputs.setdefault(name, []).append(x.double())):
        model(input_ids=IDS)
    steps = layer_sequential(model, IDS, CPU, 2, frozenset((HESSIAN,)))
    collected = {f"{s.prefix}.{n}": stats for s in steps for n, stats in s.stats.items() if ".experts." in n}
    assert set(collected) == set(slices.values())
    for name, stats in collected.items():
        x = torch.cat(inputs.get(name, [torch.zeros(0, matrices[name].in_features, dtype=torch.float64)]))
        assert torch.allclose(stats.hessian.double(), 2 / IDS.shape[0] * x.T @ x, rtol=1e-4, atol=1e-5), name


@pytest.mark.parametrize("family", ["MixtralForCausalLM", "GptOssForCausalLM"])
def test_n_m_structure_holds_in_every_expert(moe_folders, family, tmp_path):
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(moe_folders[family]), "--method", "wanda", "--sparsity", "0.5",
                 "--structure", "2:4", "--calib", "lee", "--nsamples", "4", "--seqlen", "32", "--out", str(out)]) == 0
    for name, matrix in prunable_matrices(load(out)).items():
        groups = (matrix.weight == 0).reshape(matrix.out_features, -1, 4).sum(dim=-1)
        assert torch.all(groups == 2), name


def test_routed_statistics_equal_dense_ones_when_every_token_is_routed():
    """A Routed batch holding every token of every sample gives the dense statistics (norms,
    SparseGPT's Hessian, DSnoT's moments)."""
    x = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(1))
    kinds = frozenset((NORMS, HESSIAN, MOMENTS))
    dense, routed = InputStats(kinds), InputStats(kinds)
    dense.add(x)
    order = torch.randperm(15, generator=torch.Generator().manual_seed(2))  # any token order
    routed.add(Routed(x.reshape(15, 4)[order], torch.arange(3).repeat_interleave(5)[order], 3))
    assert (routed.nsamples, routed.ntokens) == (dense.nsamples, dense.ntokens) == (3, 15)
    assert torch.allclose(routed.norms(), dense.norms())
    assert torch.allclose(routed.hessian, dense.hessian, atol=1e-6)
    for field in ("col_sum", "sq_sum", "within_ss"):
        assert torch.allclose(getattr(routed.moments, field), getattr(dense.moments, field), atol=1e-5), field


def counted_from_safetensors(folder) -> tuple[float, dict[str, float]]:
    """Sparsity over every decoder-block weight of two or more dimensions but routers and biases,
    and per expert matrix, read from the saved files (split per expert or fused, as saved)."""
    tensors = {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}
    zeros = total = 0
    experts = {}
    for key, tensor in tensors.items():
        if not key.startswith("model.layers.") or tensor.dim() < 2 or key.endswith("_bias") or ROUTER.search(key):
            continue
        zeros, total = zeros + int((tensor == 0).sum()), total + tensor.numel()
        if ".experts." in key:
            slices = tensor.unbind(0) if tensor.dim() == 3 else [tensor]
            experts.update({f"{key}/{e}": float((s == 0).float().mean()) for e, s in enumerate(slices)})
    return zeros / total, experts


def target_failures(folder, method: str, top_up: str, out) -> list[str]:
    """Prune ``folder`` with ``method`` and ``top_up`` through the CLI; what is wrong with the
    sparsity counted from the saved files (none: an empty list)."""
    extra = ["--atp-step", "0.1"] if top_up == "atp" else []  # a short grid on two blocks
    code = main(["prune", "--model", str(folder), "--method", method, "--top-up", top_up,
                 "--sparsity", str(SPARSITY), "--calib", "lee", "--nsamples", "4", "--search-nsamples", "4",
                 "--seqlen", "32", "--out", str(out), *extra])
    if code != 0:
        return [f"{method}+{top_up}: exit {code}"]
    achieved, experts = counted_from_safetensors(out)
    manifest = json.loads((out / "neuroal.json").read_text())
    failures = []
    if abs(achieved - SPARSITY) > 0.01 or abs(manifest["achieved_sparsity"] - achieved) > 1e-9:
        failures.append(f"{method}+{top_up}: counted {achieved:.4f}, manifest {manifest['achieved_sparsity']:.4f}")
    if not experts or min(experts.values()) < 0.1:  # allocators spread blocks by up to +-0.35 here
        failures.append(f"{method}+{top_up}: an expert left (nearly) dense: {min(experts.values(), default=None)}")
    return failures


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_neuroal_over_wanda_reaches_its_target(moe_folders, family, tmp_path):
    assert not target_failures(moe_folders[family], "wanda", "neuroal", tmp_path / "out")


@pytest.mark.slow  # every method with every top-up: about 40 prunes a family
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_every_method_and_top_up_reaches_its_target(moe_folders, family, tmp_path):
    failures = [f for method in METHOD_NAMES for top_up in ALLOCATOR_NAMES
                for f in target_failures(moe_folders[family], method, top_up, tmp_path / f"{method}-{top_up}")]
    assert not failures, failures


def test_an_expert_no_token_reaches_is_pruned_by_magnitude(moe_folders, tmp_path, monkeypatch):
    """Route no token to expert 3: its slices are pruned by |W| and the manifest names them."""
    from transformers.models.mixtral import modeling_mixtral

    def never_expert_3(self, hidden_states):  # MixtralTopKRouter.forward with expert 3 masked out
        logits = torch.nn.functional.linear(hidden_states.reshape(-1, self.hidden_dim), self.weight)
        logits[:, 3] = -torch.inf
        top, index = torch.topk(torch.softmax(logits.float(), dim=-1), self.top_k, dim=-1)
        return logits, top / top.sum(dim=-1, keepdim=True), index

    monkeypatch.setattr(modeling_mixtral.MixtralTopKRouter, "forward", never_expert_3)
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(moe_folders["MixtralForCausalLM"]), "--method", "wanda", "--sparsity",
                 str(SPARSITY), "--calib", "lee", "--nsamples", "4", "--seqlen", "32", "--out", str(out)]) == 0
    manifest = json.loads((out / "neuroal.json").read_text())
    assert manifest["unreached_experts"] == [f"model.layers.{b}.mlp.experts.{t}.3" for b in (0, 1)
                                             for t in ("gate_up_proj", "down_proj")]
    dense, pruned = load(moe_folders["MixtralForCausalLM"]), load(out)
    for name, matrix in prunable_matrices(pruned).items():
        if name.endswith(".3") and ".experts." in name:
            weight = prunable_matrices(dense)[name].weight
            keep = weight.shape[1] - int(SPARSITY * weight.shape[1])
            kept = torch.topk(weight.abs(), keep, dim=1).indices
            expected = torch.ones_like(weight, dtype=torch.bool).scatter_(1, kept, False)
            assert torch.equal(matrix.weight == 0, expected), name


def test_a_weight_the_pruner_cannot_handle_is_refused(tokenizer, tmp_path, capsys):
    """GPT-2 keeps its projections in Conv1D modules ([in, out] weights): refused, not skipped."""
    from transformers import GPT2Config

    folder = save_tiny_model(GPT2Config(vocab_size=SMOLLM2_VOCAB, n_embd=32, n_layer=2, n_head=4), tokenizer,
                             tmp_path / "gpt2")
    out = tmp_path / "pruned"
    capsys.readouterr()
    code = main(["prune", "--model", str(folder), "--method", "wanda", "--sparsity", "0.5", "--calib", "lee",
                 "--nsamples", "2", "--seqlen", "32", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "attn.c_attn.weight" in err[0] and "refused" in err[0]
    assert not out.exists() and list(tmp_path.iterdir()) == [folder]
