"""A campaign on a work pool submits each cell at most once, whatever 503s the Prefect server
answers while the cell is submitted or polled, and waits out 503s while polling.

A Prefect test server behind a proxy that answers 503 on demand; a deployment of the cell flow
with no worker: the test plays the worker, moving each submitted flow run to Completed.
"""

from __future__ import annotations

import threading

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.runtime import flow_run
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter
from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings
from prefect.states import Completed, Running

from flows import campaign as campaign_flow
from neuroal.config import CampaignConfig
from servers import FlakyProxy, fixture_prefect_harness  # noqa: F401 - the fixture, by its name
from tasks import cells

CREATE = r"/deployments/[^/]+/create_flow_run$"


@pytest.fixture
def deployment(prefect_harness) -> str:
    """The cell flow's deployment, on no work pool: its runs wait until the test completes them."""
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("prune-cell")
        return str(client.create_deployment(flow_id=flow_id, name="flaky", entrypoint="flows.prune_cell:prune_cell"))


def _play_worker(deployment: str, stop: threading.Event) -> None:
    """Complete every flow run of ``deployment`` as it appears, as a worker would that ran it."""
    with get_client(sync_client=True) as client:
        while not stop.wait(0.2):
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment])),
                                         flow_run_filter=FlowRunFilter())
            for run in runs:
                if run.state.is_scheduled():
                    client.set_flow_run_state(run.id, Running(), force=True)
                    client.set_flow_run_state(run.id, Completed(), force=True)


def test_503s_while_submitting_and_polling_do_not_submit_a_cell_twice(deployment, monkeypatch):
    config = CampaignConfig.model_validate({
        "prune": {"model": ["tiny"], "method": ["magnitude", "wanda"], "top_up": ["uniform"], "sparsity": [0.5]},
        "campaign": {"executor": "pool", "deployment": "prune-cell/flaky"}})
    monkeypatch.setattr(campaign_flow, "_SUBMIT_BACKOFF_SECONDS", 0.1)
    monkeypatch.setattr(campaign_flow, "_POLL_SECONDS", 0.1)
    proxy, stop = FlakyProxy(PREFECT_API_URL.value().removesuffix("/api")), threading.Event()
    # Cells' creations reach the server, whose answer is lost; then polls fail before reaching it.
    proxy.fail("POST", CREATE, times=2, forward=True)
    worker = threading.Thread(target=_play_worker, args=(deployment, stop))
    worker.start()

    @flow
    def submit_all():
        # Polls of the cells' flow runs (any but this one's own, which Prefect's engine reads), more
        # often than a submission is retried: waiting rides them out.
        proxy.fail("GET", rf"/flow_runs/(?!{flow_run.id})[0-9a-f-]{{36}}$", times=8, forward=False)
        return campaign_flow._run_on_pool(config, None, cells.NO_REFRESH)

    try:  # no client retries: every 503 reaches the campaign's own retry
        with temporary_settings({PREFECT_API_URL: f"{proxy.url}/api", PREFECT_CLIENT_MAX_RETRIES: 0}):
            states = submit_all()
    finally:
        stop.set()
        worker.join()
        proxy.close()
    assert proxy.failed == 10
    assert sorted(states) == sorted(cells.cell_name(c) for c in config.cells())
    assert all(state.is_completed() for state in states.values()), {n: s.message for n, s in states.items()}
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment])))
    assert len(runs) == 2 and len({r.idempotency_key for r in runs}) == 2
