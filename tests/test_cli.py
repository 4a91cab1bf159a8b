"""The `neuroal` command: prune end to end, checkpoint contents, and bad input (exit 2, one line,
nothing written)."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

from conftest import save_tiny_model, tiny_llama_config
from neuroal.checkpoint import read_manifest
from neuroal.cli import build_parser, main
from neuroal.digests import file_digest

FAST = ["--nsamples", "4", "--seqlen", "32", "--calib", "lee"]


def prune_args(model, out, *extra, method="wanda", sparsity="0.5"):
    return ["prune", "--model", str(model), "--method", method, "--sparsity", sparsity, *FAST, "--out", str(out), *extra]


def assert_rows_pruned(folder: Path, sparsity: float):
    """Count zeros in the saved weights (not the manifest): exactly floor(s * in) in every row."""
    from transformers import AutoModelForCausalLM

    from neuroal.models import prunable_matrices

    model = AutoModelForCausalLM.from_pretrained(folder)
    for name, lin in prunable_matrices(model).items():
        zeros = (lin.weight == 0).sum(dim=1)
        assert torch.all(zeros == math.floor(sparsity * lin.in_features)), name
    return model


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_prune_writes_loadable_checkpoint(tiny_llama, tmp_path, method, capsys):
    out = tmp_path / "pruned"
    assert main(prune_args(tiny_llama, out, method=method)) == 0
    model = assert_rows_pruned(out, 0.5)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()
    manifest = read_manifest(out)
    assert manifest.method == method and manifest.top_up == "uniform"
    assert manifest.target_sparsity == 0.5 and manifest.achieved_sparsity == pytest.approx(0.5)
    assert len(manifest.module_sparsity) == 3 * 7
    assert manifest.source.kind == "folder" and len(manifest.source.digest) == 64
    assert manifest.files == {"model.safetensors": file_digest(out / "model.safetensors")}
    assert {"torch", "transformers", "neuroal"} <= set(manifest.versions)
    assert manifest.timings["prune"] >= 0 and manifest.seed == 0
    if method == "wanda":
        assert manifest.calibration.corpus == "lee" and manifest.calibration.nsamples == 4
        assert len(manifest.calibration.digest) == 64
    else:
        assert manifest.calibration is None  # magnitude reads no data
    printed = json.loads(capsys.readouterr().out)
    assert printed["achieved_sparsity"] == pytest.approx(0.5)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_progress_bars_show_unless_quiet(tiny_llama, tmp_path, capsys):
    for flags, shown in (([], True), (["--quiet"], False)):
        assert main([*flags, *prune_args(tiny_llama, tmp_path / f"out-{shown}")]) == 0
        err = capsys.readouterr().err
        assert ("calibration" in err and "prune wanda" in err) == shown, err


def test_same_seed_same_masks(tiny_llama, tmp_path):
    for name in ("a", "b"):
        assert main(prune_args(tiny_llama, tmp_path / name)) == 0
    assert file_digest(tmp_path / "a" / "model.safetensors") == file_digest(tmp_path / "b" / "model.safetensors")
    assert main(prune_args(tiny_llama, tmp_path / "c", "--seed", "1")) == 0
    a, c = read_manifest(tmp_path / "a"), read_manifest(tmp_path / "c")
    assert a.calibration.digest != c.calibration.digest


def test_existing_output_needs_overwrite(tiny_llama, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(prune_args(tiny_llama, out, method="magnitude")) == 0
    before = file_digest(out / "model.safetensors")
    assert main(prune_args(tiny_llama, out, method="magnitude", sparsity="0.3")) == 2
    assert "already exists" in capsys.readouterr().err
    assert file_digest(out / "model.safetensors") == before
    assert main(prune_args(tiny_llama, out, "--overwrite", method="magnitude", sparsity="0.3")) == 0
    assert_rows_pruned(out, 0.3)


def _bad_inputs(tiny_llama, tmp_path):
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_llama, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return {
        "sparsity-zero": ([], {"sparsity": "0"}, "sparsity"),
        "sparsity-one": ([], {"sparsity": "1"}, "sparsity"),
        "sparsity-above": ([], {"sparsity": "1.5"}, "sparsity"),
        "unknown-method": ([], {"method": "random"}, "method"),
        "unknown-top-up": (["--top-up", "magic"], {}, "top_up"),
        "search-over-nsamples": (["--top-up", "neuroal", "--search-nsamples", "8"], {}, "exceeds --nsamples"),
        "unknown-neuroal-mode": (["--top-up", "neuroal", "--neuroal-mode", "fast"], {}, "neuroal_mode"),
        "n-not-below-m": (["--structure", "4:2"], {}, "structure"),
        "bad-structure": (["--structure", "half"], {}, "structure"),
        "n-m-vs-sparsity": (["--structure", "2:4"], {"sparsity": "0.6"}, "--sparsity 0.5"),
        "n-m-with-owl": (["--structure", "2:4", "--top-up", "owl"], {}, "works with --top-up uniform, dsnot, not owl"),
        "unknown-corpus": (["--calib", "nonsense"], {}, "corpus"),
        "seqlen-over-context": (["--seqlen", "1000"], {}, "context"),
        "missing-model": ([], {"model": tmp_path / "nowhere"}, "does not exist"),
        "not-a-model": ([], {"model": tmp_path}, "config.json"),
        "truncated-weights": ([], {"model": truncated}, "cannot load model"),
    }


@pytest.mark.parametrize(
    "case",
    ["sparsity-zero", "sparsity-one", "sparsity-above", "unknown-method", "unknown-top-up", "search-over-nsamples",
     "unknown-neuroal-mode",
     "n-not-below-m", "bad-structure", "n-m-vs-sparsity", "n-m-with-owl", "unknown-corpus", "seqlen-over-context",
     "missing-model", "not-a-model", "truncated-weights"],
)
def test_bad_input_is_one_line_exit_2_nothing_written(tiny_llama, tmp_path, capsys, case):
    extra, changes, needle = _bad_inputs(tiny_llama, tmp_path)[case]
    out = tmp_path / "out"
    args = prune_args(changes.get("model", tiny_llama), out, *extra, method=changes.get("method", "wanda"),
                      sparsity=changes.get("sparsity", "0.5"))
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_seqlen_longer_than_every_document(tokenizer, tmp_path, capsys):
    long_context = save_tiny_model(tiny_llama_config(max_position_embeddings=100_000), tokenizer, tmp_path / "m")
    args = prune_args(long_context, tmp_path / "out")
    args[args.index("--seqlen") + 1] = "50000"
    assert main(args) == 2
    assert "longer than" in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["campaign", "report"])
def test_pipeline_subcommands_come_from_the_entry_point(command):
    """The library registers no pipeline command itself: `campaign` and `report` come from flows/cli.py."""
    args = build_parser().parse_args([command])
    assert args.command == command and args.handler.__module__ == "flows.cli"


def test_python_dash_m_entry_point(tmp_path, processes):
    result = processes.run(
        [sys.executable, "-m", "neuroal", "prune", "--model", "x", "--method", "wanda", "--sparsity", "2",
         "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "sparsity" in result.stderr
    usage = processes.run([sys.executable, "-m", "neuroal", "prune"], capture_output=True, text=True, timeout=120)
    assert usage.returncode == 2 and usage.stderr.strip().count("\n") == 0 and "required" in usage.stderr


@pytest.mark.slow
def test_smollm2_wanda_half(tmp_path):
    out = tmp_path / "smol"
    args = ["prune", "--model", "smollm2-135m", "--method", "wanda", "--sparsity", "0.5",
            "--nsamples", "8", "--seqlen", "128", "--out", str(out)]
    assert main(args) == 0
    model = assert_rows_pruned(out, 0.5)
    assert type(model).__name__ == "LlamaForCausalLM"
    manifest = read_manifest(out)
    assert manifest.source.kind == "alias" and manifest.calibration.corpus == "wikipedia"
    assert all(s == 0.5 for s in manifest.module_sparsity.values()) and len(manifest.module_sparsity) == 210
