"""Reliability and safety (issue 8): a fault may cost time, never data or a wrong result.

One section per point of the issue. Where a point is tested in another module, the test is named
here rather than repeated.

1. Bad input (CLI flags, params.yaml, model specs, corpora, checkpoints): one line on stderr that
   names the problem and the fix, exit code 2, no traceback, nothing written.
   - here: test_bad_input_is_refused_by_every_command: every bad input through `neuroal prune`,
     `eval` and `campaign` (unknown method, top-up, corpus, task; sparsity outside (0, 1); N:M with
     N >= M; nsamples, search set or seqlen that the corpus or model cannot serve; a missing folder,
     a folder that is not a model, a truncated safetensors file, a model that is not a causal LM, one
     that needs remote code, pickle-only weights).
   - prune flags also: tests/test_cli.py::test_bad_input_is_one_line_exit_2_nothing_written,
     ::test_seqlen_longer_than_every_document, ::test_python_dash_m_entry_point (usage errors).
   - eval flags also: tests/test_evaluation.py::test_eval_bad_input_is_one_line_exit_2.
   - params.yaml (unknown keys are errors, typos included):
     tests/test_campaign_config.py::test_bad_params_are_refused_with_the_key_named,
     ::test_campaign_bad_input_is_one_line_exit_2_nothing_written.
   - model specs: tests/test_models.py::test_bad_model_specs, ::test_truncated_weights_are_refused.
2. Integrity: digests of the weight files in neuroal.json, verified before evaluation; caches
   keyed by content digests, verified on read, rebuilt when corrupt.
   - recorded: tests/test_cli.py::test_prune_writes_loadable_checkpoint.
   - verified: tests/test_evaluation.py::test_eval_refuses_a_corrupt_checkpoint (a flipped byte);
     here: test_eval_refuses_weight_files_that_are_not_the_recorded_ones.
   - caches: here: test_campaign_caches_rebuild_a_corrupt_entry (calibration set, allocation);
     tests/test_neuroal.py::test_dense_statistics_are_cached_on_disk_and_verified (dense activations),
     tests/test_data.py::test_wikipedia_parses_cold_and_rebuilds_a_corrupt_cache (parsed corpus),
     tests/test_pipeline.py::test_corrupt_stage_files_read_as_missing,
     tests/test_campaign.py::test_campaign_tracks_versions_and_reuses (a deleted checkpoint is rebuilt).
3. Faults: kill -9 leaves no folder or a complete one, and a rerun resumes to the same results; an
   unreachable S3 or MLflow server: retries, a clear message, checkpoints kept, pushed or logged later.
   - here: test_prune_killed_at_any_moment_leaves_nothing_or_a_complete_checkpoint,
     test_campaign_killed_mid_run_resumes_to_the_same_results,
     test_unreachable_s3_remote_keeps_the_checkpoints_and_a_rerun_pushes_them,
     test_unreachable_mlflow_keeps_the_checkpoints_and_a_rerun_logs_them.
   - the tasks alone: tests/test_versioning.py::test_unreachable_s3_fails_clearly_after_retries,
     tests/test_tracking.py::test_unreachable_server_retries_then_names_it,
     tests/test_campaign.py::test_a_flaky_task_is_retried_and_a_failing_cell_fails_the_campaign_only.
4. Safety: remote code and pickled weights only when allowed; credentials never written.
   - refusals: test_bad_input_is_refused_by_every_command (cases remote-code, pickle-only); here:
     test_remote_code_does_not_run_without_the_flag, test_allow_pickle_loads_bin_weights.
   - credentials: here: test_no_credential_reaches_any_file_or_log (a campaign on S3, every file and
     log grepped); tests/test_tracking.py::test_credentials_are_never_logged (credential-like params).
5. Determinism: same cell, same seed, bit-identical masks on the CPU.
   - tests/test_cli.py::test_same_seed_same_masks (wanda, uniform); here:
     test_same_neuroal_cell_twice_gives_identical_checkpoints (the NeuroAl search included).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import torch
import yaml
from conftest import SMOLLM2_VOCAB, save_tiny_model, tiny_llama_config
from servers import (  # noqa: F401 - the fixture_* are the fixtures prefect_harness, moto_server, s3_env
    fixture_moto_server,
    fixture_prefect_harness,
    fixture_s3_env,
    free_port,
    list_keys,
    make_bucket,
    s3_client,
)

from neuroal.checkpoint import read_manifest
from neuroal.cli import main
from neuroal.digests import file_digest, json_digest

SMALL = ["--nsamples", "4", "--seqlen", "32", "--calib", "lee"]  # a prune of the tiny model in ~1 s
EVAL_SMALL = ["--ppl", "lee", "--tasks", "none", "--limit", "2", "--seqlen", "32"]
LONG_CONTEXT = 100_000  # longer than every document and test split of the offline corpora


def prune_args(model, out, *extra, method="wanda", sparsity="0.5") -> list[str]:
    return ["prune", "--model", str(model), "--method", method, "--sparsity", sparsity, *SMALL,
            "--out", str(out), *extra]


def leftovers(folder: Path) -> list[str]:
    """What interrupted atomic writes leave (``.tmp-`` and ``.old-`` names), anywhere under ``folder``."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*")
                  if ".tmp-" in p.name or ".old-" in p.name)


def assert_absent_or_complete(out: Path) -> bool:
    """The checkpoint folder is absent, or loads and its weights match neuroal.json. Returns
    whether it exists."""
    from transformers import AutoModelForCausalLM

    if not out.exists():
        return False
    manifest = read_manifest(out)  # refuses weights that differ from the recorded digests
    assert manifest.files and AutoModelForCausalLM.from_pretrained(out) is not None
    return True


# ---------------------------------------------------------------------------------------------
# Models that are bad input, built once for the module.


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_llama, tokenizer) -> dict[str, Path]:
    """Folders that are not valid input, by case name, plus the good ``tiny`` and ``long`` ones."""
    from transformers import AutoModelForMaskedLM, BertConfig

    root = tmp_path_factory.mktemp("models")
    truncated = shutil.copytree(tiny_llama, root / "truncated")
    os.truncate(truncated / "model.safetensors", (truncated / "model.safetensors").stat().st_size // 2)
    (root / "not-a-model").mkdir()
    (root / "not-a-model" / "notes.txt").write_text("not a model")
    bert = AutoModelForMaskedLM.from_config(BertConfig(vocab_size=SMOLLM2_VOCAB, hidden_size=32, num_hidden_layers=2,
                                                       num_attention_heads=4, intermediate_size=48))
    bert.save_pretrained(root / "bert")
    tokenizer.save_pretrained(root / "bert")
    return {
        "tiny": tiny_llama,
        "long": save_tiny_model(tiny_llama_config(max_position_embeddings=LONG_CONTEXT), tokenizer, root / "long"),
        "missing": root / "missing",
        "not-a-model": root / "not-a-model",
        "truncated": truncated,
        "bert": root / "bert",
        "remote-code": _remote_code_model(tiny_llama, root / "remote-code"),
        "pickle-only": _pickle_only_model(tiny_llama, root / "pickle-only"),
    }


REMOTE_CODE_RAN = "remote-code-ran"  # the shipped code creates this file beside itself when it runs


def _remote_code_model(tiny: Path, folder: Path) -> Path:
    """The tiny model as a custom architecture whose code ships with it (``auto_map``)."""
    shutil.copytree(tiny, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="neuroal-custom", auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                                                         "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_custom.py").write_text(
        f"from pathlib import Path\nPath({str(folder / REMOTE_CODE_RAN)!r}).touch()\n"
        "from transformers import LlamaConfig\n\nclass CustomConfig(LlamaConfig):\n    model_type = 'neuroal-custom'\n")
    return folder


def _pickle_only_model(tiny: Path, folder: Path) -> Path:
    """The tiny model with its weights in a pickled ``pytorch_model.bin`` instead of safetensors."""
    from safetensors.torch import load_file

    shutil.copytree(tiny, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(load_file(tiny / "model.safetensors"), folder / "pytorch_model.bin")
    return folder


# ---------------------------------------------------------------------------------------------
# 1. Bad input: one line, exit code 2, no traceback, nothing written.


@dataclass(frozen=True)
class BadInput:
    """One bad input as each command takes it (None: not an input of that command)."""

    needle: str  # in the error line
    model: str = "tiny"  # a key of the ``models`` fixture
    prune: list | None = None  # extra `neuroal prune` flags
    eval: list | None = None  # extra `neuroal eval` flags
    params: dict | None = None  # params.yaml changes, by dotted key path


BAD_INPUTS = {
    # Their prune flags are tested in tests/test_cli.py; here through eval and campaign.
    "unknown-method": BadInput("method", params={"prune.method": "random"}),
    "unknown-top-up": BadInput("top_up", params={"prune.top_up": "magic"}),
    "unknown-calibration-corpus": BadInput("unknown corpus 'nonsense'", params={"prune.calib": "nonsense"}),
    "unknown-eval-corpus": BadInput("unknown corpus 'nonsense'", params={"eval.ppl": ["nonsense"]}),
    "unknown-task": BadInput("unknown offline task 'mmlu'", params={"eval.tasks": ["mmlu"]}),
    "sparsity-zero": BadInput("sparsity", params={"prune.sparsity": 0.0}),
    "sparsity-one": BadInput("sparsity", params={"prune.sparsity": 1.0}),
    "search-set-over-nsamples": BadInput("exceeds --nsamples",
                                         params={"prune.top_up": "neuroal", "prune.search_nsamples": 8}),
    "seqlen-over-context": BadInput("context of 512 tokens", eval=["--seqlen", "1000"],
                                    params={"prune.seqlen": 1000}),
    # Through every command that takes them.
    "n-equal-to-m": BadInput("1 <= N < M", prune=["--structure", "4:4"], params={"prune.structure": "4:4"}),
    "nsamples-zero": BadInput("nsamples", prune=["--nsamples", "0"], params={"prune.nsamples": 0}),
    "eval-seqlen-over-context": BadInput("context of 512 tokens", params={"eval.seqlen": 1000}),
    "seqlen-over-every-document": BadInput("longer than --seqlen 50000", model="long",
                                           prune=["--seqlen", "50000"], params={"prune.seqlen": 50_000}),
    "eval-seqlen-over-test-split": BadInput("shorter than one --seqlen 50000 window", model="long",
                                            eval=["--seqlen", "50000"], params={"eval.seqlen": 50_000}),
    "eval-seqlen-one": BadInput("at least 2", eval=["--seqlen", "1"], params={"eval.seqlen": 1}),
    "missing-folder": BadInput("does not exist", model="missing", params={}),
    "not-a-model": BadInput("no config.json", model="not-a-model", eval=[], params={}),
    "truncated-safetensors": BadInput("truncated or corrupt", model="truncated", eval=[], params={}),
    "not-a-causal-lm": BadInput("not a causal language model (BertForMaskedLM)", model="bert",
                                prune=[], eval=[], params={}),
    "remote-code": BadInput("pass --trust-remote-code", model="remote-code", prune=[], eval=[], params={}),
    "pickle-only": BadInput("pass --allow-pickle", model="pickle-only", prune=[], eval=[], params={}),
}


def _takes(command: str, case: BadInput) -> bool:
    return {"prune": case.prune, "eval": case.eval, "campaign": case.params}[command] is not None


COMMAND_CASES = [pytest.param(command, name, id=f"{command}-{name}") for name, case in BAD_INPUTS.items()
                 for command in ("prune", "eval", "campaign") if _takes(command, case)]


def _run_bad(command: str, case: BadInput, model: Path, work: Path) -> list[str]:
    """Run ``command`` with the bad input in ``work``; returns what it left in ``work``."""
    if command == "prune":
        code = main(prune_args(model, work / "out", *case.prune))
    elif command == "eval":
        code = main(["eval", "--model", str(model), *EVAL_SMALL, *case.eval, "--out", str(work / "m.json")])
    else:
        params = {"prune": {"model": str(model), "method": "wanda", "top_up": "uniform", "sparsity": 0.5,
                            "calib": "lee", "nsamples": 4, "seqlen": 32},
                  "eval": {"ppl": ["lee"], "tasks": [], "limit": 2, "seqlen": 32},
                  "campaign": {"experiment": "bad-input", "out": "runs/campaign"}}
        for key_path, value in case.params.items():
            section, key = key_path.split(".")
            params[section][key] = value
        (work / "params.yaml").write_text(yaml.safe_dump(params))
        code = main(["campaign", "--params", "params.yaml"])
    assert code == 2
    return sorted(p.name for p in work.iterdir() if p.name != "params.yaml")


@pytest.mark.parametrize(("command", "name"), COMMAND_CASES)
def test_bad_input_is_refused_by_every_command(models, tmp_path, monkeypatch, capsys, command, name):
    case, work = BAD_INPUTS[name], tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # a campaign writes runs/ and mlflow.db to its working folder
    left = _run_bad(command, case, models[case.model], work)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("neuroal: error: ") and case.needle in lines[0], captured.err
    assert "Traceback" not in captured.err + captured.out
    assert left == []  # no out folder, metrics file, runs/, mlflow.db or temporary


def test_remote_code_does_not_run_without_the_flag(models, tmp_path):
    folder = models["remote-code"]
    for command in (prune_args(folder, tmp_path / "out"), ["eval", "--model", str(folder), *EVAL_SMALL]):
        assert main(command) == 2
    assert not (folder / REMOTE_CODE_RAN).exists()


# ---------------------------------------------------------------------------------------------
# 2. Integrity: checkpoints verified before evaluation; corrupt cache entries rebuilt.


def test_eval_refuses_weight_files_that_are_not_the_recorded_ones(tiny_llama, tmp_path, capsys):
    """A flipped byte is tests/test_evaluation.py's case; here an unrecorded weight file and a
    manifest that records none."""
    checkpoint, metrics = tmp_path / "ckpt", tmp_path / "m.json"
    assert main(prune_args(tiny_llama, checkpoint, method="magnitude")) == 0

    def assert_refused(needle: str):
        capsys.readouterr()
        assert main(["eval", "--model", str(checkpoint), *EVAL_SMALL, "--out", str(metrics)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "is corrupt" in err and needle in err, err
        assert not metrics.exists()

    extra = checkpoint / "model-extra.safetensors"
    shutil.copy(checkpoint / "model.safetensors", extra)
    assert_refused("model-extra.safetensors is not one of its recorded weight files")
    extra.unlink()
    manifest = json.loads((checkpoint / "neuroal.json").read_text())
    (checkpoint / "neuroal.json").write_text(json.dumps({**manifest, "files": {}}))
    assert_refused("records no weight digests")


def test_campaign_caches_rebuild_a_corrupt_entry(tiny_llama, tmp_path, monkeypatch):
    """The calibration and allocation tasks key their files by content digests; a corrupt file is
    drawn or allocated again (same digest), not used."""
    import neuroal.pipeline
    from neuroal.config import PruneConfig
    from neuroal.pipeline import Plan
    from tasks import cells

    config = PruneConfig(model=str(tiny_llama), method="wanda", top_up="owl", sparsity=0.5, calib="lee",
                         nsamples=4, seqlen=32)
    calls = {"calibrate": 0, "allocate": 0}
    for stage in calls:
        real = getattr(neuroal.pipeline, stage)
        monkeypatch.setattr(neuroal.pipeline, stage,
                            lambda *a, _real=real, _stage=stage, **k: calls.__setitem__(_stage, calls[_stage] + 1)
                            or _real(*a, **k))
    plan = Plan.of(config)
    calibration = cells.calibration.fn(plan, tmp_path)
    allocation = cells.allocate.fn(plan, calibration, tmp_path)
    assert cells.calibration.fn(plan, tmp_path) == calibration and calls == {"calibrate": 1, "allocate": 1}

    for path in (calibration.path, allocation.path):
        data = bytearray(Path(path).read_bytes())
        data[-1] ^= 0x01  # one flipped bit: the file still parses, its digest no longer matches
        Path(path).write_bytes(bytes(data))
    assert cells.calibration.fn(plan, tmp_path) == calibration
    assert cells.allocate.fn(plan, calibration, tmp_path) == allocation
    assert calls == {"calibrate": 2, "allocate": 2}
    assert cells.allocate.fn(plan, calibration, tmp_path) == allocation and calls["allocate"] == 2  # written back


# ---------------------------------------------------------------------------------------------
# 3. Faults: kill -9 at any moment; unreachable S3 and MLflow servers.


def run_and_kill(processes, cmd: list[str], cwd: Path, ready: Callable[[], bool], env: dict | None = None,
                 timeout: float = 240) -> bool:
    """Run ``cmd`` in its own process group and SIGKILL the group as soon as ``ready()`` holds.

    Returns True when it was killed, False when it exited first (with code 0).
    """
    log = (cwd / "killed.log").open("ab")
    process = processes.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while process.poll() is None:
            if ready():
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                return True
            assert time.monotonic() < deadline, f"{cmd} ran past {timeout} s"
            time.sleep(0.005)
        assert process.returncode == 0, (cwd / "killed.log").read_text()
        return False
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


def neuroal_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "neuroal", "-q", *args]


def temporaries(folder: Path, containing: str | None = None, besides: tuple = ()) -> list[Path]:
    """Temporary checkpoint folders in ``folder`` (holding ``containing`` when given), other than
    ``besides``."""
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if ".tmp-" in p.name and p not in besides
            and (containing is None or (p / containing).is_file())]


def test_prune_killed_at_any_moment_leaves_nothing_or_a_complete_checkpoint(tiny_llama, tmp_path, processes):
    parent = tmp_path / "runs"
    out = parent / "pruned"
    cmd = neuroal_command(*prune_args(tiny_llama, out))
    moments = {  # when to kill: while loading, as the folder is being written, during its plot
        "after 3 s": lambda start, old: time.monotonic() - start > 3,
        "temporary folder created": lambda start, old: bool(temporaries(parent, besides=old)),
        "manifest written, plot not yet": lambda start, old: bool(temporaries(parent, "neuroal.json", besides=old)),
    }
    for moment, ready in moments.items():
        start, old = time.monotonic(), tuple(temporaries(parent))  # an earlier kill's leftovers
        assert run_and_kill(processes, cmd, tmp_path, partial(ready, start, old)), f"the prune ended before '{moment}'"
        assert not assert_absent_or_complete(out), moment  # killed before the rename: no folder
    assert temporaries(parent)  # what the killed writers left

    assert main(prune_args(tiny_llama, out)) == 0  # the next run completes and cleans up
    assert assert_absent_or_complete(out) and leftovers(parent) == []
    assert main(prune_args(tiny_llama, tmp_path / "uninterrupted")) == 0
    assert read_manifest(out).files == read_manifest(tmp_path / "uninterrupted").files


@pytest.fixture
def fast_retries(monkeypatch):
    """One retry without waiting for every network task, and no client-side retries below them:
    the behaviour under test is the same, in seconds instead of a minute."""
    from tasks.tracking import finish_campaign, log_cell, start_campaign
    from tasks.versioning import dvc_push

    for task in (dvc_push, start_campaign, log_cell, finish_campaign):
        monkeypatch.setattr(task, "retries", 1)
        monkeypatch.setattr(task, "retry_delay_seconds", 0)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")


def campaign_folder(folder: Path, model: Path, methods=("magnitude", "wanda")) -> Path:
    """A folder with params.yaml for a small grid on ``model`` (one cell per method) and MLflow in a
    SQLite file."""
    folder.mkdir(parents=True, exist_ok=True)
    params = {"prune": {"model": [str(model)], "method": list(methods), "top_up": ["uniform"], "sparsity": 0.5,
                        "calib": "lee", "nsamples": 4, "seqlen": 32},
              "eval": {"ppl": ["lee"], "tasks": [], "limit": 2, "seqlen": 32},
              "campaign": {"experiment": "reliability", "out": "runs/campaign"}}
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    return folder


def count_prunes(monkeypatch) -> list:
    import neuroal.pipeline

    calls, real = [], neuroal.pipeline.prune_to_checkpoint
    monkeypatch.setattr(neuroal.pipeline, "prune_to_checkpoint", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    return calls


def checkpoints(folder: Path) -> dict[str, dict]:
    """Every complete checkpoint of a campaign folder: its recorded weight digests, verified."""
    root = folder / "runs" / "campaign" / "checkpoints"
    return {p.name: read_manifest(p).files for p in sorted(root.iterdir())
            if p.is_dir() and not p.name.startswith(".")}


def last_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


@pytest.mark.usefixtures("prefect_harness")
def test_campaign_killed_mid_run_resumes_to_the_same_results(tiny_llama, tmp_path, monkeypatch, processes):
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME

    reference = campaign_folder(tmp_path / "reference", tiny_llama)
    monkeypatch.chdir(reference)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{reference / 'mlflow.db'}")
    assert main(["campaign", "--no-dvc"]) == 0

    killed = campaign_folder(tmp_path / "killed", tiny_llama)
    uri = f"sqlite:///{killed / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PREFECT_API_URL": PREFECT_API_URL.value(),
           "PREFECT_HOME": str(PREFECT_HOME.value())}
    folder = killed / "runs" / "campaign" / "checkpoints"
    # Kill while the second checkpoint is being written: the first one is complete by then.
    assert run_and_kill(processes, neuroal_command("campaign", "--no-dvc"), killed, lambda: bool(temporaries(folder)) and any(
        (p / "neuroal.json").is_file() for p in folder.iterdir() if not p.name.startswith(".")), env=env)
    assert len(checkpoints(killed)) == 1 and temporaries(folder)

    monkeypatch.chdir(killed)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    prunes = count_prunes(monkeypatch)
    assert main(["campaign", "--no-dvc"]) == 0
    assert len(prunes) == 1  # only the cell that was cut short
    assert checkpoints(killed) == checkpoints(reference) and len(checkpoints(reference)) == 2
    assert leftovers(killed / "runs") == []
    results = [json.loads((f / "runs/campaign/results.json").read_text()) for f in (reference, killed)]
    assert [c["metrics"]["ppl"] for c in results[0]["cells"]] == [c["metrics"]["ppl"] for c in results[1]["cells"]]


@pytest.mark.usefixtures("prefect_harness", "fast_retries")
def test_unreachable_s3_remote_keeps_the_checkpoints_and_a_rerun_pushes_them(tiny_llama, tmp_path, s3_env,
                                                                          monkeypatch, capfd):
    from tasks import versioning
    from tasks.versioning import DVC_REMOTE, dvc_status_clean

    folder = campaign_folder(tmp_path / "work", tiny_llama, methods=["magnitude"])
    monkeypatch.chdir(folder)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", closed)
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", closed)
    pushes, configure = [], versioning.configure_remote
    monkeypatch.setattr(versioning, "configure_remote", lambda *a: pushes.append(1) or configure(*a))
    prunes = count_prunes(monkeypatch)
    remote = ["--dvc-remote", "s3://reliability/dvc"]

    assert main(["campaign", *remote]) == 1
    message = last_error_line(capfd.readouterr().err)
    assert message.startswith("neuroal: campaign failed: 1 of 1 cells failed") and len(pushes) == 2  # retried
    assert "remote 'neuroal' (s3://reliability/dvc)" in message and "stay on local disk" in message
    kept = checkpoints(folder)
    assert len(kept) == 1 and len(prunes) == 1

    make_bucket(s3_env, "reliability")  # the remote is back
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env)
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3_env)
    assert main(["campaign", *remote]) == 0
    assert len(prunes) == 1 and checkpoints(folder) == kept  # pushed, not pruned again
    (name,) = kept
    assert dvc_status_clean(folder, [folder / "runs/campaign/lineage" / name], remote=DVC_REMOTE)
    assert any(key.startswith("dvc/files/md5/") for key in list_keys(s3_env, "reliability", "dvc/"))


@pytest.mark.usefixtures("prefect_harness", "fast_retries")
def test_unreachable_mlflow_keeps_the_checkpoints_and_a_rerun_logs_them(tiny_llama, tmp_path, monkeypatch, capfd):
    import mlflow

    from tasks import tracking

    folder = campaign_folder(tmp_path / "work", tiny_llama)
    monkeypatch.chdir(folder)
    server = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    attempts, uri = [], tracking.tracking_uri
    monkeypatch.setattr(tracking, "tracking_uri", lambda: attempts.append(1) or uri())
    prunes = count_prunes(monkeypatch)

    assert main(["campaign", "--no-dvc"]) == 1
    message = last_error_line(capfd.readouterr().err)
    assert message.startswith(f"neuroal: campaign failed: MLflow tracking server {server} is unreachable"), message
    assert "checkpoints are kept" in message and len(attempts) == 2  # the start of the campaign, retried once
    kept = checkpoints(folder)
    assert len(kept) == 2 and len(prunes) == 2

    store = f"sqlite:///{folder / 'mlflow.db'}"  # tracking is back
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    assert main(["campaign", "--no-dvc"]) == 0
    assert len(prunes) == 2 and checkpoints(folder) == kept  # logged, not pruned again
    client = mlflow.MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("reliability").experiment_id])
    assert {r.info.run_name for r in runs} >= set(kept)


# ---------------------------------------------------------------------------------------------
# 4. Safety: pickled weights only when allowed; credentials never written anywhere.


def test_allow_pickle_loads_bin_weights(models, tmp_path):
    """Refused by default (see the pickle-only case above); with the flag the checkpoint is
    safetensors and its source digest covers the pickled file."""
    folder, out = models["pickle-only"], tmp_path / "pruned"
    assert main(prune_args(folder, out, "--allow-pickle")) == 0
    manifest = read_manifest(out)
    assert list(manifest.files) == ["model.safetensors"] and not list(out.glob("*.bin"))
    assert manifest.source.digest == json_digest({"pytorch_model.bin": file_digest(folder / "pytorch_model.bin")})
    assert main(prune_args(models["tiny"], tmp_path / "from-safetensors")) == 0
    assert manifest.files == read_manifest(tmp_path / "from-safetensors").files  # same weights, same result


FAKE_SECRETS = {  # distinctive, so that any copy of them is found
    "AWS_ACCESS_KEY_ID": "AKIANEUROALFAKE7Q3Z",
    "AWS_SECRET_ACCESS_KEY": "neuroal-fake-secret-9f8e7d6c5b4a",
    "MLFLOW_TRACKING_USERNAME": "neuroal-fake-user-1a2b",
    "MLFLOW_TRACKING_PASSWORD": "neuroal-fake-password-5c4b3a",
}


@pytest.mark.usefixtures("prefect_harness")
def test_no_credential_reaches_any_file_or_log(tiny_llama, tmp_path, s3_env, monkeypatch, capfd, caplog):
    from prefect.settings import PREFECT_HOME

    for name, value in FAKE_SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    folder = campaign_folder(tmp_path / "work", tiny_llama, methods=["wanda"])
    monkeypatch.chdir(folder)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
    make_bucket(s3_env, "secrets")
    caplog.set_level("INFO")

    assert main(["campaign", "--dvc-remote", "s3://secrets/dvc", "--artifact-location", "s3://secrets/mlflow"]) == 0
    captured = capfd.readouterr()
    files = [p for p in folder.rglob("*") if p.is_file()] + [p for p in Path(PREFECT_HOME.value()).rglob("*")
                                                             if p.is_file()]
    written = {str(p): p.read_bytes() for p in files}
    bucket = s3_client(s3_env)
    written |= {f"s3://secrets/{key}": bucket.get_object(Bucket="secrets", Key=key)["Body"].read()
                for key in list_keys(s3_env, "secrets")}
    written |= {"stdout": captured.out.encode(), "stderr": captured.err.encode(), "logs": caplog.text.encode()}
    names = {Path(name).name for name in written}
    assert {"neuroal.json", "mlflow.db", "config.local", "results.json"} <= names  # the scan saw them
    assert any(name.startswith("s3://secrets/mlflow/") for name in written)
    for secret in FAKE_SECRETS.values():
        assert not [name for name, data in written.items() if secret.encode() in data], secret


# ---------------------------------------------------------------------------------------------
# 5. Determinism: the same cell with the same seed gives bit-identical masks on the CPU.


def test_same_neuroal_cell_twice_gives_identical_checkpoints(tiny_llama, tmp_path):
    """The NeuroAl search (block and row lambdas) and the masks it leads to repeat exactly."""
    extra = ["--top-up", "neuroal", "--search-nsamples", "2", "--device", "cpu"]
    for name in ("a", "b"):
        assert main(prune_args(tiny_llama, tmp_path / name, *extra, sparsity="0.6")) == 0
    a, b = (read_manifest(tmp_path / name) for name in ("a", "b"))
    assert a.files == b.files and a.summary == b.summary and a.calibration == b.calibration
    assert a.module_sparsity == b.module_sparsity
