"""Scale-out through a Prefect work pool: the `nightly` deployment fans its cells out, then reports
and publishes its artifacts; and a fleet whose machines share nothing but the servers runs a
campaign, reports it and gives every checkpoint back.

A real `prefect server start` and process workers on 127.0.0.1, the deployments registered from the
project's own prefect.yaml with `prefect deploy --all`; everything is stopped at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import project_repository
from servers import (  # noqa: F401 - fixtures, by their names
    FAKE_AWS,
    fixture_mlflow_server,
    fixture_moto_server,
    fixture_prefect_server,
    list_keys,
    make_bucket,
    stop,
)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
POOL = "neuroal"


@pytest.fixture(scope="module")
def pool(prefect_server) -> dict:
    """The work pool and the project's deployments on the server; yields its clients' environment."""
    _prefect(prefect_server, "work-pool", "create", POOL, "--type", "process")
    _prefect(prefect_server, "deploy", "--all")  # NEUROAL_HOME is resolved on each worker, at run time
    return prefect_server


def _prefect(env, *args, cwd=REPO) -> str:
    result = subprocess.run([str(BIN / "prefect"), "--no-prompt", *args], env=env, cwd=cwd,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _workers(env_of: dict, logs: Path, command: list[str]) -> list[subprocess.Popen]:
    """The worker ``command`` in each machine's checkout (``env_of``: name -> environment)."""
    logs.mkdir(exist_ok=True)
    workers = []
    for name, env in env_of.items():
        with (logs / f"{name}.log").open("w") as log:
            workers.append(subprocess.Popen([*command, "--name", name], env=env, cwd=env["NEUROAL_HOME"],
                                            stdout=log, stderr=subprocess.STDOUT))
    return workers


def _tails(logs: Path) -> str:
    return "".join(f"\n--- {log.name}\n{log.read_text()[-3000:]}" for log in sorted(logs.glob("*.log")))


def test_nightly_campaign_fans_out_through_the_work_pool(pool, tiny_llama, tmp_path):
    workspace = tmp_path / "project"
    workspace.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=workspace, check=True)
    (workspace / "params.yaml").write_text(yaml.safe_dump({
        "prune": {"model": [str(tiny_llama)], "method": ["magnitude", "wanda"], "top_up": ["uniform", "owl"],
                  "sparsity": 0.5, "calib": "lee", "nsamples": 4, "seqlen": 32},
        "eval": {"ppl": ["lee"], "tasks": [], "limit": 2, "seqlen": 32},
        "campaign": {"experiment": "pool", "executor": "pool"},
    }))
    env = {**pool, "NEUROAL_HOME": str(workspace), "MLFLOW_TRACKING_URI": f"sqlite:///{workspace / 'mlflow.db'}"}
    nightly = _api(env, "post", "/deployments/filter", {"deployments": {"name": {"any_": ["nightly"]}}})
    assert nightly[0]["schedules"][0]["schedule"]["cron"] == "0 2 * * *"

    logs = tmp_path / "logs"
    workers = _workers({"worker-1": env, "worker-2": env}, logs,
                       [str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--limit", "2"])
    try:  # the scheduled deployment, started now: it runs on a worker and fans its cells out to the pool
        result = subprocess.run([str(BIN / "prefect"), "--no-prompt", "deployment", "run", "nightly-campaign/nightly",
                                 "--param", "params=params.yaml", "--watch", "--watch-timeout", "1200"], env=env, cwd=workspace,
                                capture_output=True, text=True, timeout=1300)
    finally:
        for worker in workers:
            stop(worker)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:] + _tails(logs)
    results = json.loads((workspace / "runs/campaign/results.json").read_text())
    assert len(results["cells"]) == 4 and results["failed"] == []
    assert all(Path(workspace, c["checkpoint"], "neuroal.json").is_file() for c in results["cells"])
    assert (workspace / "runs/campaign/report/report.html").is_file()

    runs = _api(env, "post", "/flow_runs/filter", {"flow_runs": {"name": {"like_": "prune-"}}})
    assert len(runs) == 4 and all(r["deployment_id"] and r["state_type"] == "COMPLETED" for r in runs)
    (nightly_run,) = _api(env, "post", "/flow_runs/filter", {"flow_runs": {"name": {"like_": "nightly-"}}})
    assert nightly_run["state_type"] == "COMPLETED" and "regression" not in nightly_run["tags"]
    picked = [set(re.findall(r"submitting flow run '([^']+)'", log.read_text())) for log in sorted(logs.glob("*.log"))]
    assert {r["id"] for r in runs} | {nightly_run["id"]} == picked[0] | picked[1]  # all ran on the pool

    # The nightly run's artifacts: the results table and the links, beside the run in the UI.
    listed = _prefect({**env, "COLUMNS": "250"}, "artifact", "ls")  # rich cuts the keys to the terminal's width
    assert "nightly-results" in listed and "nightly-report" in listed
    table = _api(env, "post", "/artifacts/filter", {"artifacts": {"key": {"any_": ["nightly-results"]}}})
    rows = json.loads(table[0]["data"])
    assert len(rows) == 5 and {r["status"] for r in rows} == {"finished"} and all(r["ppl lee"] > 1 for r in rows)


def _api(env, method: str, path: str, body: dict) -> list[dict]:
    response = httpx.request(method, env["PREFECT_API_URL"] + path, json=body, timeout=30)
    response.raise_for_status()
    return response.json()


# --- The fleet: machines A (the campaign), B and C (workers), D (a colleague's), each its own
# checkout, HOME, PREFECT_HOME and NEUROAL_CACHE; shared: the Prefect server, the MLflow server
# (artifacts proxied to S3), and the S3 buckets for DVC and Prefect's results.

FLEET_PARAMS = {
    "prune": {"model": ["models/tiny-llama"], "method": ["wanda"], "top_up": ["uniform", "neuroal"], "sparsity": 0.5,
              "calib": "lee", "nsamples": 4, "search_nsamples": 2, "seqlen": 32,
              "neuroal_mode": "dense", "neuroal_strategy": "coarse"},
    "eval": {"ppl": ["lee"], "tasks": [], "limit": 2, "seqlen": 32},
    "campaign": {"experiment": "fleet", "out": "runs/campaign"},
}
RESULTS_BLOCK = "s3-bucket/neuroal-results"
FLEET_S3 = {"NEUROAL_S3": "s3://fleet"}


def _origin(folder: Path, model: Path) -> Path:
    """The project's repository as the fleet clones it (``project_repository``), with its
    prefect.yaml, deploy/, and the source model: a local folder that every clone has."""
    folder.mkdir()
    shutil.copy(REPO / "prefect.yaml", folder / "prefect.yaml")
    shutil.copytree(REPO / "deploy", folder / "deploy")
    shutil.copytree(model, folder / "models" / "tiny-llama")
    return project_repository(folder, FLEET_PARAMS)


def compose_command(service: str, variables: dict) -> list[str]:
    """The command line of a service of deploy/compose.yaml (entrypoint, then command), its
    ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?}`` filled from ``variables``."""
    spec = yaml.safe_load((REPO / "deploy" / "compose.yaml").read_text())["services"][service]
    entrypoint = spec.get("entrypoint", "neuroal")  # the image's
    words = [*([entrypoint] if isinstance(entrypoint, str) else entrypoint), *spec.get("command", [])]

    def fill(match):
        name, default = match.group(1), match.group(3)
        return variables[name] if name in variables or default is None else default

    return [re.sub(r"\$\{(\w+)(:-([^}]*)|:\?)?\}", fill, str(word)) for word in words]


def _machine(home: Path, checkout: Path, shared: dict) -> dict:
    """One machine's environment: its own HOME, Prefect home, caches and checkout, the servers' addresses."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "PREFECT_", "NEUROAL_"))}
    return {**env, **shared, "PATH": f"{BIN}{os.pathsep}{env['PATH']}", "HOME": str(home), "PREFECT_HOME": str(home / ".prefect"),
            "XDG_CACHE_HOME": str(home / ".cache"), "HF_HOME": str(home / ".cache" / "huggingface"),
            "NEUROAL_CACHE": str(home / ".cache" / "neuroal"), "NEUROAL_HOME": str(checkout)}


def _run(env: dict, *cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), env=env, cwd=env["NEUROAL_HOME"], capture_output=True, text=True, timeout=900)


def _sha256s(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_a_fleet_that_shares_only_servers_runs_reports_and_restores_a_campaign(
        prefect_server, mlflow_server, moto_server, tiny_llama, tmp_path):
    from mlflow import MlflowClient

    make_bucket(moto_server, "fleet")
    origin = _origin(tmp_path / "origin", tiny_llama)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=origin, capture_output=True, text=True).stdout.strip()
    shared = {"PREFECT_API_URL": prefect_server["PREFECT_API_URL"], "PREFECT_WORKER_QUERY_SECONDS": "2",
              "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK": RESULTS_BLOCK, "MLFLOW_TRACKING_URI": mlflow_server,
              **FAKE_AWS, "AWS_ENDPOINT_URL": moto_server}
    machines = {}
    for name in "ABCD":
        subprocess.run(["git", "clone", "-q", str(origin), str(tmp_path / name)], check=True)
        machines[name] = _machine(tmp_path / f"home-{name}", tmp_path / name, shared)
    a, d = machines["A"], machines["D"]
    checkout = {name: Path(env["NEUROAL_HOME"]) for name, env in machines.items()}

    # The commands of deploy/compose.yaml's services, as processes; the servers are the fixtures.
    assert compose_command("setup", FLEET_S3)[-1] == "s3://fleet/prefect-results"
    made = _run(a, *compose_command("setup", FLEET_S3))
    assert made.returncode == 0 and f"PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK={RESULTS_BLOCK}" in made.stdout, made.stderr
    assert compose_command("worker", FLEET_S3)[-2:] == ["--limit", "1"]  # one cell at a time: both take one
    logs = tmp_path / "logs"
    workers = _workers({"B": machines["B"], "C": machines["C"]}, logs, compose_command("worker", FLEET_S3))
    try:
        campaign = _run(a, *compose_command("campaign", FLEET_S3))
    finally:
        for worker in workers:
            stop(worker)
    assert campaign.returncode == 0, campaign.stderr[-3000:] + _tails(logs)

    results = json.loads((checkout["A"] / "runs/campaign/results.json").read_text())
    assert len(results["cells"]) == 2 and results["failed"] == []
    assert not (checkout["A"] / "runs/campaign/checkpoints").exists()  # the cells ran elsewhere
    assert not (checkout["A"] / "runs/campaign/lineage").exists()
    ran_on = {c["name"]: [m for m in "BC" if (checkout[m] / c["checkpoint"] / "neuroal.json").is_file()]
              for c in results["cells"]}
    assert sorted(m for where in ran_on.values() for m in where) == ["B", "C"], ran_on  # once each, on both

    client = MlflowClient(mlflow_server)
    parent = client.get_run(results["mlflow_parent_run_id"])
    assert parent.data.tags["git_revision"] == head  # unchanged checkouts: the same clean revision everywhere
    for cell in results["cells"]:
        assert client.get_run(cell["mlflow_run_id"]).data.tags["git_revision"] == head

    shutil.rmtree(checkout["A"] / "runs")  # the report comes from the tracking server alone
    report = _run(a, *compose_command("campaign", FLEET_S3)[:1], "report")  # `run --rm campaign report`
    assert report.returncode == 0, report.stderr[-3000:]
    folder = checkout["A"] / "runs/campaign/report"
    markdown = (folder / "report.md").read_text()
    assert "failed" not in markdown and "| wanda | uniform | lee " in markdown and "| wanda | neuroal | lee " in markdown
    plots = {p.name for p in folder.glob("*.png")}  # perplexity, per-block sparsity, NeuroAl's scores
    assert {f"models--tiny-llama-wanda-{kind}.png" for kind in ("perplexity", "block-sparsity", "neuroal")} <= plots
    assert all(f"]({plot})" in markdown for plot in plots)
    # Nothing but the servers held what crossed machines: tracking artifacts and results are in S3.
    assert any(k.endswith("/neuroal.json") for k in list_keys(moto_server, "mlflow"))
    assert any(k.endswith("/report/report.html") for k in list_keys(moto_server, "mlflow"))
    assert list_keys(moto_server, "fleet", "prefect-results/") and list_keys(moto_server, "fleet", "dvc/")

    for cell in results["cells"]:  # a fourth machine restores every checkpoint, verified
        out = f"ck-{cell['name']}"
        pulled = _run(d, "neuroal", "pull", "--run", cell["mlflow_run_id"], "--out", out)
        assert pulled.returncode == 0, pulled.stderr[-3000:]
        (worker,) = ran_on[cell["name"]]
        assert _sha256s(checkout["D"] / out) == _sha256s(checkout[worker] / cell["checkpoint"])
