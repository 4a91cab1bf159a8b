"""Scale-out: the `nightly` deployment (the campaign with `executor: pool`) fans its cells out to
a Prefect work pool, then reports and publishes its artifacts.

A real `prefect server start` and two process workers on 127.0.0.1, the deployments registered
from the project's own prefect.yaml with `prefect deploy --all`; everything is stopped at the end.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from servers import HOST, free_port, wait_for_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
POOL = "neuroal"


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture(scope="module")
def prefect_env(tmp_path_factory):
    """A Prefect server on a free port; yields the environment of its clients."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": f"http://{HOST}:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false",
           "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_LOGGING_LEVEL": "INFO"}
    log = (home / "server.log").open("w")
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", HOST, "--port", str(port)],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, server, timeout=180)
        _wait_healthy(env["PREFECT_API_URL"])
        yield env
    finally:
        _stop(server)
        log.close()


def _wait_healthy(api: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{api}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"Prefect server at {api} is not healthy after {timeout} s")


def _prefect(env, *args, cwd=REPO) -> str:
    result = subprocess.run([str(BIN / "prefect"), "--no-prompt", *args], env=env, cwd=cwd,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_nightly_campaign_fans_out_through_the_work_pool(prefect_env, tiny_llama, tmp_path):
    workspace = tmp_path / "project"
    workspace.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=workspace, check=True)
    (workspace / "params.yaml").write_text(yaml.safe_dump({
        "prune": {"model": [str(tiny_llama)], "method": ["magnitude", "wanda"], "top_up": ["uniform", "owl"],
                  "sparsity": 0.5, "calib": "lee", "nsamples": 4, "seqlen": 32},
        "eval": {"ppl": ["lee"], "tasks": [], "limit": 2, "seqlen": 32},
        "campaign": {"experiment": "pool", "executor": "pool"},
    }))
    env = {**prefect_env, "NEUROAL_HOME": str(workspace),
           "MLFLOW_TRACKING_URI": f"sqlite:///{workspace / 'mlflow.db'}"}
    _prefect(env, "work-pool", "create", POOL, "--type", "process")
    deploy_env = {k: v for k, v in env.items() if k != "NEUROAL_HOME"}  # resolved on each worker, at run time
    _prefect(deploy_env, "deploy", "--all")
    nightly = _api(env, "post", "/deployments/filter", {"deployments": {"name": {"any_": ["nightly"]}}})
    assert nightly[0]["schedules"][0]["schedule"]["cron"] == "0 2 * * *"

    logs = [tmp_path / f"worker-{i}.log" for i in (1, 2)]
    workers = [
        subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--name", f"worker-{i}",
                          "--limit", "2"], env=env, cwd=workspace, stdout=log.open("w"), stderr=subprocess.STDOUT)
        for i, log in zip((1, 2), logs)
    ]
    try:  # the scheduled deployment, started now: it runs on a worker and fans its cells out to the pool
        result = subprocess.run([str(BIN / "prefect"), "--no-prompt", "deployment", "run", "nightly-campaign/nightly",
                                 "--param", "params=params.yaml", "--watch", "--watch-timeout", "1200"], env=env, cwd=workspace,
                                capture_output=True, text=True, timeout=1300)
    finally:
        for worker in workers:
            _stop(worker)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:] + "".join(l.read_text()[-3000:] for l in logs)
    results = json.loads((workspace / "runs/campaign/results.json").read_text())
    assert len(results["cells"]) == 4 and results["failed"] == []
    assert all(Path(workspace, c["checkpoint"], "neuroal.json").is_file() for c in results["cells"])
    assert (workspace / "runs/campaign/report/report.html").is_file()

    runs = _api(env, "post", "/flow_runs/filter", {"flow_runs": {"name": {"like_": "prune-"}}})
    assert len(runs) == 4 and all(r["deployment_id"] and r["state_type"] == "COMPLETED" for r in runs)
    (nightly_run,) = _api(env, "post", "/flow_runs/filter", {"flow_runs": {"name": {"like_": "nightly-"}}})
    assert nightly_run["state_type"] == "COMPLETED" and "regression" not in nightly_run["tags"]
    picked = [set(re.findall(r"submitting flow run '([^']+)'", log.read_text())) for log in logs]
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
