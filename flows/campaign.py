"""The campaign: every cell of the ``params.yaml`` grid plus the dense baselines, tracked under
one MLflow parent run, checkpoints versioned with DVC, and a comparison table at the end.

Cells run in this process (``executor: local``) or on a Prefect work pool through
``run_deployment`` (``executor: pool``), so N workers on N machines share one campaign.

Tracking never holds up the compute: when the MLflow server cannot be reached at the start, the
cells still run and keep their checkpoints, and the campaign fails at the end saying so; run it
again once the server is back and the cells are logged from their caches, without pruning.
"""

from __future__ import annotations

import contextvars
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from prefect import flow
from prefect.exceptions import PrefectHTTPStatusError
from prefect.runtime import flow_run
from prefect.states import Failed, State

from flows.prune_cell import cell_metrics, prune_cell
from neuroal.config import CampaignConfig
from neuroal.environment import device_kind, library_versions
from neuroal.files import write_json_atomic
from neuroal.models import resolve_device, resolve_model
from neuroal.report import comparison_table
from tasks import cells
from tasks.tracking import ENVIRONMENT_TAG, TrackingUnavailable, finish_campaign, flatten, log_cell, start_campaign
from tasks.versioning import ensure_dvc_repo, git_revision

logger = logging.getLogger(__name__)

RESULTS = "results.json"
_SUBMIT_ATTEMPTS, _SUBMIT_BACKOFF_SECONDS = 3, 10  # Prefect's client already retried each call
# A cell's flow run is polled every _POLL_SECONDS; errors are waited out until the server has not
# answered for _OUTAGE_SECONDS (a restart of the Prefect server does not lose the cells).
_POLL_SECONDS, _OUTAGE_SECONDS = 5, 900


class CampaignFailed(RuntimeError):
    """Some cells failed; the others' results are kept (and written to results.json)."""


@flow(name="campaign", flow_run_name="campaign-{config.campaign.experiment}")
def campaign(config: CampaignConfig, root: str = ".") -> dict:
    """Run the grid; returns ``{"cells": [...], "baselines": [...], "failed": [...], "table": str}``."""
    settings, start = config.campaign, time.perf_counter()
    refresh = cells.Refresh(stages=frozenset(settings.refresh), since=time.time())
    if settings.dvc:
        ensure_dvc_repo(Path(root))
    problems = []  # what fails the campaign once every cell has run
    try:
        parent = start_campaign(settings.experiment, config.model_dump(mode="json"), settings.artifact_location,
                                tags={"git_revision": git_revision(Path(root)) or "",
                                      ENVIRONMENT_TAG: campaign_environment(config)})
    except TrackingUnavailable as exc:
        logger.error("%s; the cells run untracked", exc)
        parent, problems = None, [f"{exc} The checkpoints are kept: run the campaign again to log them"]
    baselines = [_baseline(model, config, parent, refresh) for model in config.models()] if settings.baseline else []
    states = _run_cells(config, parent, root, refresh)
    done = [s.result() for s in states.values() if s.is_completed()]
    failed = {name: _reason(s) for name, s in states.items() if not s.is_completed()}
    corpus = config.eval.ppl[0] if config.eval.ppl else None
    table = comparison_table(done, baselines, corpus) if corpus else ""
    results = {"cells": done, "baselines": baselines, "failed": list(failed), "table": table,
               "seconds": round(time.perf_counter() - start, 3), "mlflow_parent_run_id": parent}
    write_json_atomic(Path(settings.out) / RESULTS, results)
    logger.info("campaign results:\n%s", table)
    if failed:
        problems.insert(0, f"{len(failed)} of {len(states)} cells failed: "
                           + "; ".join(f"{name} ({reason})" for name, reason in failed.items()))
    if parent:
        try:
            finish_campaign(parent, "FAILED" if problems else "FINISHED")
        except TrackingUnavailable as exc:
            problems.append(str(exc))
    if problems:
        raise CampaignFailed(" ".join(problems))
    return results


def campaign_environment(config: CampaignConfig) -> dict:
    """What the report's history compares between campaigns besides the git revision: the versions
    of the libraries that compute the numbers, and the device kind of this machine (with a work
    pool, each cell's manifest records its worker's)."""
    device = resolve_device(config.prune.device)
    return {**library_versions(("torch", "transformers", "tokenizers", "lm_eval")), "device": device_kind(device)}


def _reason(state: State) -> str:
    """Why a cell failed, on one line: its exception, else Prefect's state message."""
    try:
        error = state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001 - a pool worker's result may not be readable here
        error = None
    text = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else state.message or state.name
    return " ".join(str(text).split())


def _run_cells(config: CampaignConfig, parent: str, root: str, refresh: cells.Refresh) -> dict[str, State]:
    """Final state of every cell, by name; a failing cell does not stop the others."""
    settings = config.campaign
    if settings.executor == "pool":
        return _run_on_pool(config, parent, refresh)
    return {
        cells.cell_name(cell): prune_cell(cell, config.eval, settings, parent, root, refresh, return_state=True)
        for cell in config.cells()
    }


def _run_on_pool(config: CampaignConfig, parent: str, refresh: cells.Refresh) -> dict[str, State]:
    """Submit every cell to the work pool behind ``settings.deployment`` and wait for all.

    Each submission waits in its own thread; the context copy keeps each cell's flow run a
    child of this campaign's in the Prefect UI. A submission that meets a server too busy to answer
    (503) is sent again with the same idempotency key (this campaign's flow run and the cell), so
    the server hands back the flow run if it already made one: a cell runs at most once. A cell
    that still cannot be submitted fails alone, like a cell that fails on its worker; polling rides
    out errors up to ``_OUTAGE_SECONDS`` of silence.
    """
    from prefect.deployments import run_deployment

    def submit(cell):
        key = f"{flow_run.id}:{cells.cell_name(cell)}"
        for attempt in range(_SUBMIT_ATTEMPTS):
            try:  # no root: a worker runs in its own checkout (the deployment's working directory)
                run = run_deployment(config.campaign.deployment, timeout=0, idempotency_key=key, parameters={
                    "cell": cell.model_dump(), "evaluation": config.eval.model_dump(),
                    "settings": config.campaign.model_dump(), "parent_run_id": parent,
                    "refresh": refresh.model_dump(mode="json")})
            except (PrefectHTTPStatusError, httpx.TransportError) as exc:
                error = exc
                time.sleep(_SUBMIT_BACKOFF_SECONDS * 2 ** attempt)
            else:
                return _final_state(run.id)
        return Failed(message=f"could not be submitted to the work pool: {error}")

    with ThreadPoolExecutor(max_workers=len(config.cells())) as pool:
        futures = {cells.cell_name(c): pool.submit(contextvars.copy_context().run, submit, c) for c in config.cells()}
        return {name: future.result() for name, future in futures.items()}


def _final_state(flow_run_id) -> State:
    """The final state of a cell's flow run, polled; a server that stays silent for
    ``_OUTAGE_SECONDS`` fails the cell (its run may still finish: a rerun serves it from the caches)."""
    from prefect.client.orchestration import get_client

    answered = time.monotonic()
    with get_client(sync_client=True) as client:
        while True:
            try:
                state = client.read_flow_run(flow_run_id).state
                answered = time.monotonic()
                if state and state.is_final():
                    return state
            except (PrefectHTTPStatusError, httpx.TransportError) as exc:
                busy = isinstance(exc, httpx.TransportError) or exc.response.status_code >= 500
                if not busy or time.monotonic() - answered > _OUTAGE_SECONDS:
                    return Failed(message=f"lost flow run {flow_run_id} on the Prefect server: {exc}")
            time.sleep(_POLL_SECONDS)


def _baseline(model: str, config: CampaignConfig, parent: str | None, refresh: cells.Refresh) -> dict:
    """The dense model evaluated like the cells, as its own MLflow run (when tracked)."""
    name, evaluation, out = f"{cells.model_slug(model)}-dense", config.eval, Path(config.campaign.out)
    source = resolve_model(model)
    metrics = cells.evaluate(model, evaluation, out / "metrics" / f"{name}.json", name, source.digest,
                            trust_remote_code=config.prune.trust_remote_code,
                            allow_pickle=config.prune.allow_pickle, refresh=refresh)
    if parent:
        log_cell(parent, name, params=flatten({"prune": {"model": model}, "eval": evaluation.model_dump()}),
                 metrics=cell_metrics(metrics),
                 artifacts=[str(out / "metrics" / f"{name}.json")],
                 tags={"kind": "baseline", "model_digest": source.digest}, run_key=f"{name}:{metrics['key']}")
    return {"name": name, "model": model, "metrics": metrics}
