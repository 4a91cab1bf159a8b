"""The campaign flow end to end on a tiny model: a 2x2 grid tracked in MLflow, checkpoints under
DVC, reruns served from the on-disk caches, a deleted checkpoint rebuilt, retries and failures."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import project_repository
from neuroal.cli import main
from servers import (  # noqa: F401 - the fixture_* are the fixtures prefect_harness, moto_server, s3_env
    fixture_moto_server,
    fixture_prefect_harness,
    fixture_s3_env,
    list_keys,
    make_bucket,
)
from tasks.tracking import log_cell
from tasks.versioning import DVC_REMOTE, dvc_file, dvc_push, dvc_status_clean, dvc_track

pytestmark = pytest.mark.usefixtures("prefect_harness")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def workspace(tmp_path, monkeypatch, tiny_llama):
    """A clone-like project (``project_repository``) with params.yaml for a 2x2 grid, MLflow in a
    sqlite file inside it."""
    project_repository(tmp_path, {
        "prune": {"model": [str(tiny_llama)], "method": ["magnitude", "wanda"], "top_up": ["uniform", "neuroal"],
                  "sparsity": 0.5, "calib": "lee", "nsamples": 4, "search_nsamples": 2, "seqlen": 32,
                  "neuroal_mode": "dense", "neuroal_strategy": "coarse"},
        "eval": {"ppl": ["lee"], "tasks": [], "limit": 2, "seqlen": 32},
        "campaign": {"experiment": "test", "out": "runs/campaign"},
    })
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def _count_prunes(monkeypatch) -> list:
    import neuroal.pipeline

    calls, real = [], neuroal.pipeline.prune_to_checkpoint
    monkeypatch.setattr(neuroal.pipeline, "prune_to_checkpoint", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    return calls


def _count_evaluations(monkeypatch) -> list:
    import tasks.cells

    calls, real = [], tasks.cells.evaluation.evaluate
    monkeypatch.setattr(tasks.cells.evaluation, "evaluate", lambda spec: calls.append(spec.model) or real(spec))
    return calls


def _sha256_of_files(folder: Path) -> dict:
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir())}


def _fake_version(monkeypatch, library: str, version: str) -> None:
    """Make the cache keys (and manifests) read ``version`` as the installed ``library``."""
    import neuroal.environment

    real = neuroal.environment.installed_version
    monkeypatch.setattr(neuroal.environment, "installed_version", lambda name: version if name == library else real(name))


def test_campaign_tracks_versions_and_reuses(workspace, monkeypatch, capsys):
    import mlflow

    prunes, evaluations = _count_prunes(monkeypatch), _count_evaluations(monkeypatch)
    assert main(["campaign"]) == 0
    assert "| wanda | neuroal |" in capsys.readouterr().out  # the comparison table
    assert len(prunes) == 4
    results = json.loads((workspace / "runs/campaign/results.json").read_text())
    assert len(results["cells"]) == 4 and results["failed"] == [] and len(results["baselines"]) == 1

    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("test")
    runs = client.search_runs([experiment.experiment_id])
    parent = [r for r in runs if r.info.run_id == results["mlflow_parent_run_id"]][0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 5  # four cells and the dense baseline
    # The code is unchanged: the campaign's own outputs (runs/, .dvc files, dvc.lock) leave it clean.
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=workspace, capture_output=True, text=True).stdout.strip()
    assert parent.data.tags["git_revision"] == head
    for cell in results["cells"]:
        run = [r for r in children if r.info.run_name == cell["name"]][0]
        assert run.data.params["prune.sparsity"] == "0.5" and run.data.params["prune.method"] == cell["method"]
        assert "ppl.lee" in run.data.metrics and "achieved_sparsity" in run.data.metrics
        assert run.data.tags["dvc_hash"] == cell["dvc_hash"] and run.data.tags["dvc_hash"].endswith(".dir")
        assert run.data.tags["git_revision"]
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"neuroal.json", "allocation.png", Path(cell["lineage"]["path"]).name + ".dvc"} <= artifacts
        # DVC tracks the lineage form (masks and recipe), not the weights; the full folder is git-ignored.
        assert Path(cell["lineage"]["path"] + ".dvc").is_file() and not Path(cell["checkpoint"] + ".dvc").exists()
        assert run.data.tags["lineage_form"] == cell["lineage"]["form"] == "mask"
        assert run.data.metrics["lineage.bytes"] == cell["lineage"]["bytes"] < cell["lineage"]["dense_bytes"] / 12
        assert subprocess.run(["git", "check-ignore", "-q", cell["checkpoint"]], cwd=workspace).returncode == 0
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], capture_output=True, text=True,
                            cwd=workspace)
    assert status.returncode == 0 and json.loads(status.stdout) == {}  # checkpoints and the stage

    # Rerun: everything is served from the caches; no cell is pruned or evaluated again, and the
    # campaign records the same revision.
    assert len(evaluations) == 5
    assert main(["campaign"]) == 0
    assert len(prunes) == 4 and len(evaluations) == 5
    rerun = json.loads((workspace / "runs/campaign/results.json").read_text())["mlflow_parent_run_id"]
    assert client.get_run(rerun).data.tags["git_revision"] == head
    # Another transformers computes other numbers: every cell is pruned and evaluated again, once.
    _fake_version(monkeypatch, "transformers", "99.0.0")
    assert main(["campaign"]) == 0
    assert len(prunes) == 8 and len(evaluations) == 10
    manifest = json.loads(Path(results["cells"][0]["checkpoint"], "neuroal.json").read_text())
    assert manifest["versions"]["transformers"] == "99.0.0" and manifest["device_kind"] == "cpu"
    assert main(["campaign"]) == 0
    assert len(prunes) == 8 and len(evaluations) == 10
    # --refresh recomputes the named stages on purpose, once per campaign, and nothing else: the
    # three cells that read data share one calibration set, drawn again once (the same windows).
    import neuroal.pipeline

    draws, draw = [], neuroal.pipeline.calibrate
    monkeypatch.setattr(neuroal.pipeline, "calibrate", lambda plan: draws.append(plan) or draw(plan))
    assert main(["campaign", "--refresh", "evaluate,calibration"]) == 0
    assert len(draws) == 1 and len(prunes) == 8 and len(evaluations) == 15
    # A deleted checkpoint folder is rebuilt from its lineage form, byte for byte, without pruning;
    # deleted with its lineage form, it is pruned again, identical.
    victim = Path(results["cells"][1]["checkpoint"])
    before = _sha256_of_files(victim)
    subprocess.run(["rm", "-rf", str(victim)], check=True)
    assert main(["campaign"]) == 0
    assert len(prunes) == 8 and _sha256_of_files(victim) == before
    subprocess.run(["rm", "-rf", str(victim), results["cells"][1]["lineage"]["path"]], check=True)
    assert main(["campaign"]) == 0
    assert len(prunes) == 9 and _sha256_of_files(victim)["model.safetensors"] == before["model.safetensors"]
    # A checkpoint made by code that pruned differently (an older results version) is made again,
    # not rebuilt from its lineage form, which is of that older code too.
    for folder in (victim, Path(results["cells"][1]["lineage"]["path"])):
        manifest = json.loads((folder / "neuroal.json").read_text())
        (folder / "neuroal.json").write_text(json.dumps({**manifest, "results_version": manifest["results_version"] - 1}))
    assert main(["campaign"]) == 0
    assert len(prunes) == 10


def test_a_flaky_task_is_retried_and_a_failing_cell_fails_the_campaign_only(workspace, monkeypatch, capsys):
    import neuroal.pipeline

    real, failures = neuroal.pipeline.prune_to_checkpoint, {"flaky": 0}

    def faulty(plan, *args, **kwargs):
        config = plan.config
        if config.method == "magnitude" and config.top_up == "uniform" and failures["flaky"] == 0:
            failures["flaky"] += 1
            raise OSError("transient: disk full")  # once: the retry succeeds
        if config.method == "wanda" and config.top_up == "neuroal":
            raise OSError("permanent fault")
        return real(plan, *args, **kwargs)

    monkeypatch.setattr(neuroal.pipeline, "prune_to_checkpoint", faulty)
    assert main(["campaign"]) == 1
    assert "1 of 4 cells failed" in capsys.readouterr().err and failures["flaky"] == 1
    results = json.loads((workspace / "runs/campaign/results.json").read_text())
    assert results["failed"] == [n for n in results["failed"] if n.endswith("wanda-neuroal-s0.5")]
    assert len(results["cells"]) == 3  # the finished cells are kept
    assert all(Path(c["checkpoint"], "neuroal.json").is_file() for c in results["cells"])


def test_checkpoints_go_to_s3_as_lineage_forms_and_come_back_by_run_id(workspace, s3_env, monkeypatch):
    import mlflow
    from transformers import AutoModelForCausalLM

    make_bucket(s3_env, "neuroal")
    assert main(["campaign", "--methods", "wanda,sparsegpt", "--top-ups", "uniform", "--experiment", "s3",
                 "--dvc-remote", "s3://neuroal/dvc", "--artifact-location", "s3://neuroal/mlflow"]) == 0
    results = json.loads((workspace / "runs/campaign/results.json").read_text())
    cells = {c["method"]: c for c in results["cells"]}
    assert {m: c["lineage"]["form"] for m, c in cells.items()} == {"wanda": "mask", "sparsegpt": "values"}
    lineages = [Path(c["lineage"]["path"]) for c in cells.values()]
    assert dvc_status_clean(workspace, lineages, remote=DVC_REMOTE)  # everything pushed
    assert any(key.startswith("dvc/files/md5/") for key in list_keys(s3_env, "neuroal", "dvc/"))
    run = mlflow.MlflowClient().get_run(cells["wanda"]["mlflow_run_id"])
    assert run.info.artifact_uri.startswith("s3://neuroal/mlflow/")
    assert any(key.endswith("/neuroal.json") for key in list_keys(s3_env, "neuroal", "mlflow/"))
    assert run.data.tags["dvc_remote"] == "s3://neuroal/dvc"
    # DVC itself sees the lineage forms in this layout (the repository's own .gitignore).
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "push", "-r", DVC_REMOTE, *map(str, lineages)], cwd=workspace, check=True, capture_output=True)

    # A colleague's clone in another folder, with the run id, the remote and the source model only:
    # every file comes back byte for byte, loads, and scores the run's perplexity.
    elsewhere = workspace.parent / "elsewhere"
    subprocess.run(["git", "clone", "-q", str(workspace), str(elsewhere)], check=True)
    monkeypatch.chdir(elsewhere)
    for method, cell in cells.items():
        assert main(["pull", "--run", cell["mlflow_run_id"], "--out", method]) == 0
        assert _sha256_of_files(elsewhere / method) == _sha256_of_files(workspace / cell["checkpoint"])
        assert AutoModelForCausalLM.from_pretrained(elsewhere / method) is not None
        assert main(["eval", "--model", method, "--ppl", "lee", "--tasks", "none", "--limit", "2", "--seqlen", "32",
                     "--out", f"{method}.json"]) == 0
        assert json.loads((elsewhere / f"{method}.json").read_text())["ppl"] == cell["metrics"]["ppl"]
    wanda = cells["wanda"]["mlflow_run_id"]
    assert main(["pull", "--run", wanda, "--out", "wanda"]) == 2  # never overwrites
    assert main(["pull", "--run", "0" * 32, "--out", "other"]) == 2 and not (elsewhere / "other").exists()
    # Another model as the source: refused, nothing written.
    assert main(["pull", "--run", wanda, "--out", "other", "--source", str(elsewhere / "sparsegpt")]) == 2
    assert not (elsewhere / "other").exists()

    # A run of an older campaign, which tracked the full checkpoint folder, still pulls and verifies.
    old = workspace / "old" / Path(cells["wanda"]["checkpoint"]).name
    shutil.copytree(workspace / cells["wanda"]["checkpoint"], old)
    dvc_track.fn(old, workspace)
    dvc_push.fn([old], workspace, "s3://neuroal/dvc")
    old_run = log_cell(results["mlflow_parent_run_id"], old.name, params={}, metrics={},
                       artifacts=[old / "neuroal.json", dvc_file(old)], tags={"dvc_remote": "s3://neuroal/dvc"})
    assert main(["pull", "--run", old_run, "--out", "old"]) == 0
    assert _sha256_of_files(elsewhere / "old") == _sha256_of_files(old)
