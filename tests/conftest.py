"""Shared fixtures: the real default model (converted once into the neuroal cache) and tiny random
models built from configs, saved as local folders with the real tokenizer. Nothing is downloaded."""

from __future__ import annotations

import inspect
import subprocess
from pathlib import Path

import pytest
import torch

SMOLLM2_VOCAB = 49152  # tiny models share the SmolLM2 tokenizer, so they need its vocabulary
REPO = Path(__file__).resolve().parents[1]

# Test tiers (pyproject.toml's markers), set from the fixtures a test uses, itself or through other
# fixtures: a server or a subprocess (the pipeline's, git's, DVC's) makes it `system`; a model
# folder (all are built with the real tokenizer) or an MLflow store `integration`; none of these
# `unit`. Asking for the real smollm2-135m folder itself (not only its tokenizer) makes it `slow`,
# and a slow test (the real model, full prunes) is never a unit. A tier written on a test may raise
# the derived one, never lower it; a test gets exactly one tier.
TIERS = ("unit", "integration", "system")
SYSTEM_FIXTURES = {"prefect_harness", "prefect_server", "moto_server", "mlflow_server", "s3_env", "processes"}
INTEGRATION_FIXTURES = {"tokenizer", "store"}
SLOW_ARGUMENTS = {"smollm2_folder"}


def pytest_collection_modifyitems(items):
    for item in items:
        used = set(item.fixturenames)
        if SLOW_ARGUMENTS & set(inspect.signature(item.function).parameters):
            item.add_marker("slow")
        slow = item.get_closest_marker("slow") is not None  # the real model or full prunes: never a unit
        derived = 2 if used & SYSTEM_FIXTURES else 1 if used & INTEGRATION_FIXTURES or slow else 0
        written = [TIERS.index(m.name) for m in item.iter_markers() if m.name in TIERS]
        if len(written) > 1 or (written and written[0] < derived):
            raise pytest.UsageError(f"{item.nodeid}: marked {[TIERS[w] for w in written]}, but its fixtures make "
                                    f"it {TIERS[derived]} (tests/conftest.py: one tier, never below the fixtures')")
        if not written:
            item.add_marker(TIERS[derived])


@pytest.fixture
def processes():
    """The ``subprocess`` module, for a test that starts processes: asking for it makes the test `system`."""
    return subprocess


def project_repository(folder: Path, params: dict) -> Path:
    """A git repository laid out as a clone of this one: its .gitignore, ``params``, the DVC stage
    with the code it depends on, and ``.dvc/``, committed (files put in ``folder`` before are too)."""
    import yaml

    from tasks.versioning import ensure_dvc_repo

    folder.mkdir(exist_ok=True)
    (folder / ".gitignore").write_text((REPO / ".gitignore").read_text())
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    copy_dvc_stage(folder)
    subprocess.run(["git", "init", "-q"], cwd=folder, check=True)
    ensure_dvc_repo.fn(folder)  # committed, as this repository's .dvc/ is
    subprocess.run(["git", "add", "-A"], cwd=folder, check=True)
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "project"],
                   cwd=folder, check=True)
    return folder


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


def tiny_moe_configs(vocab_size: int = 128) -> dict:
    """One tiny mixture-of-experts config per family of the table, and GPT-OSS through the generic
    path (transposed, interleaved gate/up, biases, a router named ``router``): 4 experts, 2 per
    token. Input sizes of 80 keep per-row rounding under 0.01 at the tests' sparsities.
    Qwen2-MoE has a shared expert and a dense first block (``mlp_only_layers``)."""
    import transformers as tf

    common = dict(vocab_size=vocab_size, hidden_size=80, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=20, intermediate_size=80, num_experts_per_tok=2,
                  tie_word_embeddings=True)
    qwen = dict(**common, num_experts=4, moe_intermediate_size=80)
    return {
        "MixtralForCausalLM": tf.MixtralConfig(**common, num_local_experts=4),
        "Qwen2MoeForCausalLM": tf.Qwen2MoeConfig(**qwen, shared_expert_intermediate_size=80, mlp_only_layers=[0]),
        "Qwen3MoeForCausalLM": tf.Qwen3MoeConfig(**qwen),
        "OlmoeForCausalLM": tf.OlmoeConfig(**{k: v for k, v in common.items() if k != "head_dim"}, num_experts=4),
        "GptOssForCausalLM": tf.GptOssConfig(**common, num_local_experts=4, sliding_window=8,
                                             layer_types=["sliding_attention", "full_attention"]),
    }


MOE_FAMILIES = list(tiny_moe_configs())


@pytest.fixture(scope="session")
def family_folders(tmp_path_factory, tokenizer) -> dict:
    """Every family of ``tiny_family_configs`` saved once as a model folder with the real tokenizer."""
    configs = tiny_family_configs(vocab_size=SMOLLM2_VOCAB)
    return {f: save_tiny_model(c, tokenizer, tmp_path_factory.mktemp(f)) for f, c in configs.items()}


def input_norms_by_whole_model_hooks(model, ids, batch_size: int | None = None) -> dict:
    """Independent computation: whole-model forwards (``batch_size`` windows each, default all) with
    a hook on every linear of the blocks, and for fused experts the model's eager experts forward
    with every product by an expert's slice recorded; Wanda's per-column input norm
    ``sqrt(sum over samples and tokens of x^2 / samples)``."""
    squares = whole_model_input_squares(model, ids, batch_size)
    return {name: torch.sqrt(total / ids.shape[0]) for name, total in squares.items()}


def whole_model_input_squares(model, ids, batch_size: int | None = None) -> dict:
    """Per prunable matrix, the per-column sum over every token it reads of ``x^2`` (float32)."""
    from neuroal.models import prunable_matrices

    squares: dict[str, torch.Tensor] = {}

    def add(name, x):
        x = x.reshape(-1, x.shape[-1]).float()
        squares[name] = squares.get(name, 0) + (x * x).sum(dim=0)

    def hook(name):
        return lambda _module, args: add(name, args[0])

    matrices = prunable_matrices(model)
    handles = [m.owner.register_forward_pre_hook(hook(n)) for n, m in matrices.items() if m.expert is None]
    slices = {storage_key(getattr(m.owner, m.param)[m.expert]): n for n, m in matrices.items() if m.expert is not None}
    if slices:
        model.set_experts_implementation("eager")  # a Python loop over experts, one product per expert
    batch_size = batch_size or ids.shape[0]
    try:
        with torch.no_grad(), ExpertProducts(slices, add):
            for start in range(0, ids.shape[0], batch_size):
                model(input_ids=ids[start : start + batch_size])
    finally:
        for h in handles:
            h.remove()
    return squares


def storage_key(tensor):
    return tensor.untyped_storage().data_ptr(), tensor.storage_offset()


class ExpertProducts(torch.overrides.TorchFunctionMode):
    """Records the left operand of every ``F.linear`` or matmul whose weight is an expert's slice of
    a fused tensor (``slices``: storage key of the slice -> name), whatever the family's layout."""

    def __init__(self, slices: dict, record):
        super().__init__()
        self.slices, self.record = slices, record

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.nn.functional.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__) and len(args) >= 2:
            weight = args[1]
            if isinstance(weight, torch.Tensor) and weight.dim() == 2 and storage_key(weight) in self.slices:
                self.record(self.slices[storage_key(weight)], args[0])
        return func(*args, **kwargs)


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
