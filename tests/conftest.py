"""Shared fixtures: the real default model (converted once into the neuroal cache) and tiny random
models built from configs, saved as local folders with the real tokenizer. Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SMOLLM2_VOCAB = 49152  # tiny models share the SmolLM2 tokenizer, so they need its vocabulary
REPO = Path(__file__).resolve().parents[1]


def copy_dvc_stage(folder: Path) -> None:
    """The repository's dvc.yaml, and the code folders its stage depends on, into a scratch project
    (``dvc commit`` of the stage hashes them)."""
    import shutil

    import yaml

    (folder / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    for dep in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["campaign"]["deps"]:
        shutil.copytree(REPO / dep, folder / dep, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


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


def tiny_family_configs(vocab_size: int = 128) -> dict:
    """One tiny config per family of the architecture table, and families not in it (Olmo, Cohere2).

    Sliding windows are 8 tokens, shorter than the tests' windows, and the families with layers of
    two kinds mix them (Gemma 2/3 and Cohere2 start sliding, Qwen2 starts global), so a runner that
    replays one block's attention mask or rotary embedding to another is caught.
    """
    import transformers as tf

    common = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    llama_like = dict(**common, intermediate_size=48, num_key_value_heads=2)
    gemma_like = dict(**llama_like, head_dim=8)  # Gemma's default head_dim is 256
    window = dict(sliding_window=8)
    sliding_then_global = dict(**window, layer_types=["sliding_attention", "full_attention"])
    return {
        "LlamaForCausalLM": tf.LlamaConfig(**llama_like),
        "MistralForCausalLM": tf.MistralConfig(**llama_like, **window),
        "Qwen2ForCausalLM": tf.Qwen2Config(**llama_like, **window, use_sliding_window=True, max_window_layers=1),
        "Qwen3ForCausalLM": tf.Qwen3Config(**gemma_like),
        "GemmaForCausalLM": tf.GemmaConfig(**gemma_like),
        "Gemma2ForCausalLM": tf.Gemma2Config(**gemma_like, **sliding_then_global),
        # Gemma 3 also has one rotary base per layer type (10k local, 1M global).
        "Gemma3ForCausalLM": tf.Gemma3TextConfig(**gemma_like, **sliding_then_global),
        "PhiForCausalLM": tf.PhiConfig(**common, intermediate_size=48),
        "Phi3ForCausalLM": tf.Phi3Config(**common, intermediate_size=48, pad_token_id=0),
        "OPTForCausalLM": tf.OPTConfig(**common, ffn_dim=48, word_embed_proj_dim=32),
        "GPTNeoXForCausalLM": tf.GPTNeoXConfig(**common, intermediate_size=48),
        "OlmoForCausalLM": tf.OlmoConfig(**llama_like),  # not in the table: generic fallback
        "Cohere2ForCausalLM": tf.Cohere2Config(**llama_like, **sliding_then_global),  # not in the table either
    }


FAMILIES = list(tiny_family_configs())


@pytest.fixture(scope="session")
def family_folders(tmp_path_factory, tokenizer) -> dict:
    """Every family of ``tiny_family_configs`` saved once as a model folder with the real tokenizer."""
    configs = tiny_family_configs(vocab_size=SMOLLM2_VOCAB)
    return {f: save_tiny_model(c, tokenizer, tmp_path_factory.mktemp(f)) for f, c in configs.items()}


def input_norms_by_whole_model_hooks(model, ids, batch_size: int | None = None) -> dict:
    """Independent computation: whole-model forwards (``batch_size`` windows each, default all) with
    a hook on every linear of the blocks; Wanda's per-column input norm
    ``sqrt(sum over samples and tokens of x^2 / samples)``."""
    from neuroal.models import prunable_linears

    squares: dict[str, torch.Tensor] = {}

    def hook(name):
        def add(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            squares[name] = squares.get(name, 0) + (x * x).sum(dim=0)
        return add

    batch_size = batch_size or ids.shape[0]
    handles = [lin.register_forward_pre_hook(hook(name)) for name, lin in prunable_linears(model).items()]
    with torch.no_grad():
        for start in range(0, ids.shape[0], batch_size):
            model(input_ids=ids[start : start + batch_size])
    for h in handles:
        h.remove()
    return {name: torch.sqrt(total / ids.shape[0]) for name, total in squares.items()}


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tokenizer) -> Path:
    """A 3-block random Llama with GQA, as a local model folder."""
    return save_tiny_model(tiny_llama_config(), tokenizer, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """An MLflow client on one SQLite store per test module (creating its schema takes seconds);
    tests use their own experiments in it."""
    from mlflow import MlflowClient

    folder = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.chdir(folder)  # a SQLite store's default artifact root is ./mlruns
        yield MlflowClient(uri)
