"""Model specs, loading, device/dtype resolution and the architecture table."""

from __future__ import annotations

import os
import time

import pytest
import torch
from torch import nn

from conftest import FAMILIES, tiny_family_configs
from neuroal.config import PruneConfig
from neuroal.errors import UserError
from neuroal.models import (
    ARCHITECTURES,
    architecture_of,
    block_matrices,
    decoder_blocks,
    load_model,
    prunable_matrices,
    resolve_device,
    resolve_dtype,
    resolve_model,
)
from neuroal.paths import cache_dir
from neuroal.pipeline import Plan

@pytest.mark.parametrize("family", FAMILIES)
def test_architecture_roles_name_real_linears(family):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_family_configs()[family])
    assert type(model).__name__ == family
    arch = architecture_of(model)
    blocks = decoder_blocks(model, arch)
    assert isinstance(blocks, nn.ModuleList) and len(blocks) == 2
    linears = block_matrices(blocks[0])
    for role, names in arch.roles().items():
        assert names, f"{family}: role {role} has no modules"
        for name in names:
            assert name in linears, f"{family}: {role} names {name}, not a linear of the block"
    # Prunable = every linear in the blocks; never the embeddings or the LM head.
    prunable = prunable_matrices(model, arch)
    assert len(prunable) == 2 * len(linears)
    assert all(model.get_submodule(name) is m.owner for name, m in prunable.items())
    assert not any(m.owner is model.get_output_embeddings() for m in prunable.values())


def test_generic_fallback_is_used_only_outside_the_table():
    assert "OlmoForCausalLM" not in ARCHITECTURES
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_family_configs()["OlmoForCausalLM"])
    arch = architecture_of(model)
    assert arch.blocks == "model.layers"
    assert arch.attn_out == ("self_attn.o_proj",) and arch.mlp_out == ("mlp.down_proj",)


def test_local_folder_loads_with_digest(tiny_llama):
    source = resolve_model(str(tiny_llama))
    assert source.kind == "folder" and len(source.digest) == 64
    model, tokenizer = load_model(source, torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert resolve_model(str(tiny_llama)).digest == source.digest  # content-derived, stable


def _private_bytes_mapped_from(folder) -> int | None:
    """Bytes of private (copied-on-write) pages in this process's maps of files in ``folder``, or
    None when nothing of it is mapped (Linux's /proc/self/smaps)."""
    private, inside = [], False
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if not fields[0].endswith(":"):  # a mapping's header line: address range, ..., path
            inside = len(fields) == 6 and fields[5].startswith(str(folder))
        elif inside and fields[0] == "Anonymous:":
            private.append(int(fields[1]) * 1024)
    return sum(private) if private else None


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads Linux's /proc/self/smaps")
def test_a_cell_faults_its_block_weights_in_writable_before_pruning(tiny_llama):
    """The loader maps safetensors copy-on-write, where a prune's first write to each page would
    trap; a cell pruned on the CPU has its block weights' pages made private on load (the
    embeddings, never written, stay shared with the page cache), with every value unchanged."""
    loaded, _ = load_model(resolve_model(str(tiny_llama)), torch.float32)
    assert _private_bytes_mapped_from(tiny_llama) == 0  # what the prefault is for: nothing private yet
    values = {name: t.clone() for name, t in loaded.state_dict().items()}
    del loaded
    model, _ = Plan.of(PruneConfig(model=str(tiny_llama), method="magnitude", sparsity=0.5, device="cpu")).load()
    blocks = sum(p.numel() * p.element_size() for p in decoder_blocks(model).parameters())
    embeddings = model.get_input_embeddings().weight
    assert blocks <= _private_bytes_mapped_from(tiny_llama) < blocks + embeddings.numel() * embeddings.element_size()
    assert values.keys() == model.state_dict().keys()
    assert all(torch.equal(t, values[name]) for name, t in model.state_dict().items())


def test_cache_dir_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("NEUROAL_CACHE", str(tmp_path / "c"))
    assert cache_dir("models") == tmp_path / "c" / "models" and (tmp_path / "c" / "models").is_dir()


@pytest.mark.slow
def test_alias_converts_once_into_neuroal_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NEUROAL_CACHE", str(tmp_path))
    source = resolve_model("smollm2-135m")
    assert source.kind == "alias" and source.folder.parent == tmp_path / "models"
    assert (source.folder / "model.safetensors").is_file() and (source.folder / "tokenizer.json").is_file()
    stamp = (source.folder / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    again = resolve_model("smollm2-135m")
    assert time.perf_counter() - start < 5  # no second conversion (that takes ~20 s)
    assert again.folder == source.folder and (again.folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in (tmp_path / "models").iterdir() if p.name.startswith(".")]  # no temp leftovers


@pytest.mark.slow
def test_smollm2_alias_loads_and_speaks(smollm2_folder):
    model, tokenizer = load_model(resolve_model("smollm2-135m"), torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert len(decoder_blocks(model)) == 30 and len(prunable_matrices(model)) == 30 * 7
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])


def test_device_and_dtype_resolution():
    cpu = resolve_device("cpu")
    assert cpu.type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", cpu) is torch.float32
    assert resolve_dtype("bfloat16", cpu) is torch.bfloat16
    with pytest.raises(UserError, match="unknown device"):
        resolve_device("tpu")
    with pytest.raises(UserError, match="unknown dtype"):
        resolve_dtype("float8", cpu)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device"):
            resolve_device("cuda:0")


def test_bad_model_specs(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="does not exist"):
        resolve_model(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="does not exist"):
        resolve_model("missing.gguf")
    with pytest.raises(UserError, match="not found"):
        resolve_model("nobody-here/no-such-model")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_model(resolve_model(str(empty)))


def test_truncated_weights_are_refused(tiny_llama, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    weights = broken / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    with pytest.raises(UserError, match="cannot load model"):
        load_model(resolve_model(str(broken)))
