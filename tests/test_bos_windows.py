"""A BOS at the start of every calibration and perplexity window for the families that need it
(Gemma), the reference's single stream for the others (Llama-likes, SmolLM2), and the override."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import transformers as tf
from conftest import SMOLLM2_VOCAB, save_tiny_model
from test_data import as_key, reference_get_c4

from neuroal.cli import main
from neuroal.config import EvalConfig, PruneConfig, validated
from neuroal.data import CalibrationSpec, load_documents, load_text, resolve_bos_per_window, sample_calibration
from neuroal.errors import UserError
from neuroal.evaluation import eval_windows, perplexity
from neuroal.models import load_model, resolve_model
from neuroal.pipeline import Plan, calibrate

CPU = torch.device("cpu")


def tiny_gemma3_config():
    return tf.Gemma3TextConfig(
        vocab_size=SMOLLM2_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, sliding_window=16,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory, tokenizer) -> Path:
    """A 2-block random Gemma3 with the SmolLM2 tokenizer (BOS id 1), as a local model folder."""
    return save_tiny_model(tiny_gemma3_config(), tokenizer, tmp_path_factory.mktemp("tiny-gemma3"))


def cell(model, **changes) -> PruneConfig:
    values = dict(model=str(model), method="wanda", sparsity=0.5, calib="lee", nsamples=6, seqlen=32, seed=3)
    return PruneConfig(**{**values, **changes})


# ------------------------------------------------------------------------------------------
# the rule


@pytest.mark.parametrize(
    ("config", "wants"),
    [(tf.Gemma3TextConfig(), True), (tf.Gemma2Config(), True), (tf.GemmaConfig(), True),
     (tf.LlamaConfig(), False), (tf.Qwen2Config(), False), (tf.MistralConfig(), False)],
)
def test_auto_is_the_family_rule_and_on_off_override(config, wants):
    assert resolve_bos_per_window("auto", config) is wants
    assert resolve_bos_per_window("on", config) is True
    assert resolve_bos_per_window("off", config) is False
    with pytest.raises(UserError, match="--bos-per-window must be one of auto, on, off"):
        resolve_bos_per_window("yes", config)


def test_config_key_reads_yaml_on_off():
    """YAML 1.1 reads a bare on/off as a boolean; both configs take it back as the word."""
    assert validated(PruneConfig, **{**cell("m").model_dump(), "bos_per_window": True}).bos_per_window == "on"
    assert EvalConfig(bos_per_window=False).bos_per_window == "off"
    with pytest.raises(UserError, match="bos_per_window"):
        validated(EvalConfig, bos_per_window="sometimes")


# ------------------------------------------------------------------------------------------
# calibration


def test_gemma3_calibration_windows_start_with_bos(tiny_gemma3, tokenizer):
    drawn = calibrate(Plan.of(cell(tiny_gemma3)))
    bos = tokenizer.bos_token_id
    assert drawn.spec.bos_per_window is True and drawn.input_ids.shape == (6, 32)
    assert (drawn.input_ids[:, 0] == bos).all()
    documents = [as_key(tokenizer(d, add_special_tokens=False).input_ids) for d in load_documents("lee", "train")]
    for row in drawn.input_ids:  # the rest is 31 contiguous tokens of one document
        assert any(as_key(row[1:]) in doc for doc in documents)
    off = calibrate(Plan.of(cell(tiny_gemma3, bos_per_window="off")))
    assert off.spec.bos_per_window is False and not (off.input_ids[:, 0] == bos).all()


def test_llama_calibration_is_the_reference_stream(tiny_llama, tokenizer):
    """auto on a Llama equals off, equals the reference loop: SmolLM2-like results unchanged."""
    auto = calibrate(Plan.of(cell(tiny_llama)))
    off = calibrate(Plan.of(cell(tiny_llama, bos_per_window="off")))
    assert auto.spec.bos_per_window is False
    assert torch.equal(auto.input_ids, off.input_ids) and auto.digest == off.digest
    state = random.getstate()  # the transcribed reference seeds the global generator
    try:
        expected = reference_get_c4(load_documents("lee", "train"), tokenizer, 6, 3, 32)
    finally:
        random.setstate(state)
    assert torch.equal(auto.input_ids, expected)
    on = calibrate(Plan.of(cell(tiny_llama, bos_per_window="on")))
    assert on.spec.bos_per_window is True and (on.input_ids[:, 0] == tokenizer.bos_token_id).all()


def test_bos_needs_room_and_a_bos_token(tokenizer):
    with pytest.raises(UserError, match="--seqlen must be at least 2 with a BOS per window"):
        sample_calibration(tokenizer, CalibrationSpec("lee", 2, 1, 0, bos_per_window=True))

    class NoBos:
        bos_token_id = None

    with pytest.raises(UserError, match="no BOS token|has none"):
        sample_calibration(NoBos(), CalibrationSpec("lee", 2, 8, 0, bos_per_window=True))


def test_manifest_records_the_resolved_choice(tiny_gemma3, tmp_path, capsys):
    out = tmp_path / "ckpt"
    args = ["prune", "--model", str(tiny_gemma3), "--method", "wanda", "--sparsity", "0.5", "--nsamples", "2",
            "--seqlen", "16", "--calib", "lee", "--out", str(out)]
    assert main(args) == 0
    calibration = json.loads((out / "neuroal.json").read_text())["calibration"]
    assert calibration["bos_per_window"] is True and calibration["corpus_digest"] == "lee"
    assert main([*args[:-2], "--bos-per-window", "off", "--out", str(tmp_path / "off")]) == 0
    assert json.loads((tmp_path / "off" / "neuroal.json").read_text())["calibration"]["bos_per_window"] is False


# ------------------------------------------------------------------------------------------
# perplexity


def test_eval_windows_with_bos(tokenizer):
    windows = eval_windows(tokenizer, "lee", 16, limit=4, bos_per_window=True)
    ids = tokenizer(load_text("lee", "test"), add_special_tokens=False).input_ids
    assert windows.shape == (4, 16) and (windows[:, 0] == tokenizer.bos_token_id).all()
    assert windows[:, 1:].flatten().tolist() == ids[: 4 * 15]  # 15 stream tokens per window, in order
    assert torch.equal(eval_windows(tokenizer, "lee", 16, limit=4), eval_windows(tokenizer, "lee", 16, 4,
                                                                                 bos_per_window=False))


def test_perplexity_with_bos_equals_direct_computation(tiny_gemma3, tokenizer):
    """[BOS] + window through the model; cross-entropy on every window token (BOS not scored)."""
    model = tf.AutoModelForCausalLM.from_pretrained(tiny_gemma3).eval()
    seqlen, count = 16, 3
    stream = tokenizer(load_text("lee", "test"), add_special_tokens=False).input_ids
    nll, scored = 0.0, 0
    with torch.no_grad():
        for i in range(count):
            tokens = stream[i * (seqlen - 1) : (i + 1) * (seqlen - 1)]
            inputs = torch.tensor([[tokenizer.bos_token_id, *tokens]])
            logp = torch.log_softmax(model(input_ids=inputs).logits[0].double(), dim=-1)
            for position, token in enumerate(tokens):  # logits at position t predict input t + 1
                nll -= logp[position, token].item()
                scored += 1
    assert scored == count * (seqlen - 1)
    windows = eval_windows(tokenizer, "lee", seqlen, count, bos_per_window=True)
    assert perplexity(model, windows, CPU, batch_size=2) == pytest.approx(math.exp(nll / scored), rel=1e-5)


def test_eval_command_resolves_and_records_the_choice(tiny_gemma3, tiny_llama, tmp_path, capsys):
    def run(model, *extra) -> dict:
        out = tmp_path / "metrics.json"
        assert main(["eval", "--model", str(model), "--ppl", "lee", "--tasks", "none", "--limit", "2",
                     "--seqlen", "16", "--out", str(out), *extra]) == 0
        return json.loads(out.read_text())

    gemma_auto, gemma_off = run(tiny_gemma3), run(tiny_gemma3, "--bos-per-window", "off")
    assert gemma_auto["bos_per_window"] is True and gemma_off["bos_per_window"] is False
    assert gemma_auto["ppl"]["lee"] != gemma_off["ppl"]["lee"]
    llama_auto, llama_off = run(tiny_llama), run(tiny_llama, "--bos-per-window", "off")
    assert llama_auto["bos_per_window"] is False and llama_auto["ppl"] == llama_off["ppl"]
    assert run(tiny_llama, "--bos-per-window", "on")["bos_per_window"] is True


def test_smollm2_perplexity_path_is_unchanged(smollm2_folder, tokenizer):
    """SmolLM2 (a Llama) resolves to no BOS per window: `evaluate` scores the reference's windows."""
    from neuroal.evaluation.evaluate import EvalSpec, evaluate

    metrics = evaluate(EvalSpec(model="smollm2-135m", ppl=("lee",), limit=2, seqlen=64, device="cpu"))
    assert metrics["bos_per_window"] is False
    ids = tokenizer(load_text("lee", "test"), return_tensors="pt").input_ids[0]
    reference = ids[: 2 * 64].reshape(2, 64)  # the reference's eval_ppl cut, written out
    model, _ = load_model(resolve_model("smollm2-135m"))
    assert metrics["ppl"]["lee"] == perplexity(model, reference, CPU)
