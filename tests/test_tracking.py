"""MLflow tracking tasks against a SQLite store in a temporary folder, S3 artifacts on a local moto
server, and a closed port for an unreachable tracking server."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from prefect import flow
from servers import (  # noqa: F401 - the fixture_* are the fixtures moto_server, s3_env, prefect_harness
    fixture_moto_server,
    fixture_prefect_harness,
    fixture_s3_env,
    free_port,
    list_keys,
    make_bucket,
)

from tasks import tracking
from tasks.runs import read_json_artifact
from tasks.tracking import (
    CAMPAIGN_CONFIG,
    TrackingUnavailable,
    finish_campaign,
    flatten,
    is_secret,
    log_cell,
    redact_url,
    start_campaign,
)


def children(client: MlflowClient, parent: str) -> list:
    experiment = client.get_run(parent).info.experiment_id
    return client.search_runs([experiment], f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent}'")


def test_flatten_nested_lists_and_flat():
    nested = {"prune": {"sparsity": 0.5, "top_up": ["owl", "neuroal"], "lambdas": {}},
              "eval": {"ppl": ("wikipedia", "lee"), "limit": None}, "seed": 0}
    flat = flatten(nested)
    assert flat == {"prune.sparsity": 0.5, "prune.top_up": "owl,neuroal", "eval.ppl": "wikipedia,lee",
                    "eval.limit": None, "seed": 0}
    assert flatten(flat) == flat  # flows may pass params already flattened
    assert flatten({"a": {"b": 1}}, prefix="x") == {"x.a.b": 1}


def test_default_tracking_uri_is_sqlite_in_working_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri() == "http://127.0.0.1:5000"


def test_campaign_with_nested_cell(store, tmp_path):
    parent = start_campaign.fn("cells", {"prune": {"sparsity": [0.5, 0.7], "method": "wanda"}},
                               tags={"git_revision": "abc123"})
    checkpoint = tmp_path / "ck"
    (checkpoint / "sub").mkdir(parents=True)
    (checkpoint / "neuroal.json").write_text("{}")
    (checkpoint / "sub" / "x.txt").write_text("x")
    report = tmp_path / "cell.json"
    report.write_text("{}")

    run_id = log_cell.fn(
        parent, "cell-a",
        params={"prune": {"sparsity": 0.5, "method": "wanda", "ppl": ["wikipedia", "lee"]}},
        metrics={"ppl": {"wikipedia": 27.5, "lee": None}, "lambdas": {"block": 0.15, "row": 0.12},
                 "tasks": {"arc_easy": {"acc": 0.5, "acc,none": 0.4, "alias": "ARC Easy"}},
                 "achieved_sparsity": 0.7, "skipped_flag": True},
        artifacts=[report, checkpoint, tmp_path / "missing.png"],
        tags={"dvc_hash": "abc.dir", "checkpoint": str(checkpoint)},
    )

    run = store.get_run(run_id)
    assert run.info.run_name == "cell-a" and run.info.status == "FINISHED"
    assert run.data.tags[MLFLOW_PARENT_RUN_ID] == parent
    assert run.data.tags["dvc_hash"] == "abc.dir" and run.data.tags["checkpoint"] == str(checkpoint)
    assert run.data.params == {"prune.sparsity": "0.5", "prune.method": "wanda", "prune.ppl": "wikipedia,lee"}
    assert run.data.metrics == {"ppl.wikipedia": 27.5, "lambdas.block": 0.15, "lambdas.row": 0.12,
                                "tasks.arc_easy.acc": 0.5, "tasks.arc_easy.acc_none": 0.4,
                                "achieved_sparsity": 0.7}
    assert {a.path for a in store.list_artifacts(run_id)} == {"cell.json", "ck"}
    assert {a.path for a in store.list_artifacts(run_id, "ck/sub")} == {"ck/sub/x.txt"}

    parent_run = store.get_run(parent)
    assert parent_run.data.params["prune.sparsity"] == "0.5,0.7"
    assert parent_run.data.tags["git_revision"] == "abc123"
    assert parent_run.info.status == "RUNNING"  # the campaign ends only in finish_campaign
    finish_campaign.fn(parent, "FAILED")
    assert store.get_run(parent).info.status == "FAILED"


def test_cells_from_worker_threads(store):
    parent = start_campaign.fn("threads", {})
    with ThreadPoolExecutor(max_workers=3) as pool:
        ids = list(pool.map(lambda i: log_cell.fn(parent, f"cell-{i}", {"i": i}, {"m": i}), range(3)))
    assert len(set(ids)) == 3
    assert {r.info.run_id for r in children(store, parent)} == set(ids)


def test_run_key_makes_logging_idempotent(store):
    parent = start_campaign.fn("idempotent", {})
    first = log_cell.fn(parent, "cell", {"a": 1}, {"m": 1.0}, run_key="cell:digest1")
    assert log_cell.fn(parent, "cell", {"a": 1}, {"m": 1.0}, run_key="cell:digest1") == first
    assert store.get_run(first).data.tags[tracking.RUN_KEY_TAG] == "cell:digest1"

    # A run that did not finish is no result: it is logged again.
    experiment = store.get_run(parent).info.experiment_id
    broken = store.create_run(experiment, tags={MLFLOW_PARENT_RUN_ID: parent, tracking.RUN_KEY_TAG: "cell:digest2"})
    store.set_terminated(broken.info.run_id, "FAILED")
    second = log_cell.fn(parent, "cell", {"a": 1}, {"m": 2.0}, run_key="cell:digest2")
    assert second not in {first, broken.info.run_id}
    assert len(children(store, parent)) == 3


def test_credentials_are_never_logged(store):
    params = {"aws": {"secret_access_key": "s3cr3t", "AWS_ACCESS_KEY_ID": "AKIAFAKE"},
              "hf_token": "hf-fake", "db": {"Password": "hunter2"}, "api_key": "k",
              "eval": {"max_tokens": 5}, "tokenizer": "smollm2"}
    parent = start_campaign.fn("secrets", params, tags={"github_token": "ghp-fake", "kind": "campaign"})
    run_id = log_cell.fn(parent, "cell", params, {}, tags={"session_token": "fake"})
    for run in (store.get_run(parent), store.get_run(run_id)):
        assert run.data.params == {"eval.max_tokens": "5", "tokenizer": "smollm2"}
        logged = {**run.data.params, **run.data.tags}
        assert not any(is_secret(key) for key in logged)
        assert not {"s3cr3t", "AKIAFAKE", "hf-fake", "hunter2", "ghp-fake"} & set(logged.values())
    logged_config = read_json_artifact(parent, CAMPAIGN_CONFIG)
    assert logged_config == {"eval": {"max_tokens": 5}, "tokenizer": "smollm2", "aws": {}, "db": {}}
    assert is_secret("campaign.AWS_SECRET_ACCESS_KEY") and is_secret("remote.access_key_id")
    assert not is_secret("eval.max_tokens") and not is_secret("prune.tokenizer")


def test_redact_url():
    assert redact_url("http://user:pw@host:5000/x") == "http://host:5000/x"
    assert redact_url("sqlite:///tmp/mlflow.db") == "sqlite:///tmp/mlflow.db"


def test_s3_artifact_location(store, s3_env, tmp_path):
    make_bucket(s3_env, "mlflow")
    parent = start_campaign.fn("s3-artifacts", {}, artifact_location="s3://mlflow/campaign")
    assert store.get_experiment_by_name("s3-artifacts").artifact_location == "s3://mlflow/campaign"
    path = tmp_path / "r.json"
    path.write_text('{"ppl": 1}')
    run_id = log_cell.fn(parent, "cell", {}, {"ppl": 1.0}, artifacts=[path])
    assert f"campaign/{run_id}/artifacts/r.json" in list_keys(s3_env, "mlflow", "campaign/")


def test_retry_policy():
    for task in (start_campaign, log_cell, finish_campaign):
        assert task.retries == 3 and task.retry_delay_seconds == [1, 4, 16]


def test_unreachable_server_retries_then_names_it(prefect_harness, monkeypatch):
    port = free_port()  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # count only Prefect's attempts
    attempts = []
    real_uri = tracking.tracking_uri
    monkeypatch.setattr(tracking, "tracking_uri", lambda: attempts.append(1) or real_uri())

    @flow
    def one_cell():
        return log_cell.with_options(retry_delay_seconds=0)("0" * 32, "cell", {}, {})

    with pytest.raises(TrackingUnavailable, match=rf"MLflow tracking server http://127\.0\.0\.1:{port} is unreachable"):
        one_cell()
    assert len(attempts) == 4  # the first try and three retries
