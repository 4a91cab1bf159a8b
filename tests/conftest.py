"""Shared fixtures: the real default model (converted once into the neuroal cache) and tiny random
models built from configs, saved as local folders with the real tokenizer. Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SMOLLM2_VOCAB = 49152  # tiny models share the SmolLM2 tokenizer, so they need its vocabulary


@pytest.fixture(scope="session")
def smollm2_folder() -> Path:
    """The converted safetensors folder of the ``smollm2-135m`` alias."""
    from neuroal.models import resolve_model

    return resolve_model("smollm2-135m").folder


@pytest.fixture(scope="session")
def tokenizer(smollm2_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_folder)


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    values = dict(
        vocab_size=SMOLLM2_VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as in SmolLM2
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    return LlamaConfig(**{**values, **overrides})


def save_tiny_model(config, tokenizer, folder: Path, seed: int = 0) -> Path:
    """Build a random model from ``config`` and save it with ``tokenizer`` as a model folder."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tokenizer) -> Path:
    """A 3-block random Llama with GQA, as a local model folder."""
    return save_tiny_model(tiny_llama_config(), tokenizer, tmp_path_factory.mktemp("tiny-llama"))
