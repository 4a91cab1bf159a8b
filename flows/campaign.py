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

from prefect import flow
from prefect.states import State

from flows.prune_cell import cell_metrics, prune_cell
from neuroal.config import CampaignConfig
from neuroal.files import write_json_atomic
from neuroal.models import resolve_model
from neuroal.report import comparison_table
from tasks import cells
from tasks.tracking import TrackingUnavailable, finish_campaign, flatten, log_cell, start_campaign
from tasks.versioning import ensure_dvc_repo, git_revision

logger = logging.getLogger(__name__)

RESULTS = "results.json"


class CampaignFailed(RuntimeError):
    """Some cells failed; the others' results are kept (and written to results.json)."""


@flow(name="campaign", flow_run_name="campaign-{config.campaign.experiment}")
def campaign(config: CampaignConfig, root: str = ".") -> dict:
    """Run the grid; returns ``{"cells": [...], "baselines": [...], "failed": [...], "table": str}``."""
    settings, start = config.campaign, time.perf_counter()
    if settings.dvc:
        ensure_dvc_repo(Path(root))
    problems = []  # what fails the campaign once every cell has run
    try:
        parent = start_campaign(settings.experiment, config.model_dump(), settings.artifact_location,
                                tags={"git_revision": git_revision(Path(root)) or ""})
    except TrackingUnavailable as exc:
        logger.error("%s; the cells run untracked", exc)
        parent, problems = None, [f"{exc} The checkpoints are kept: run the campaign again to log them"]
    baselines = [_baseline(model, config, parent) for model in config.models()] if settings.baseline else []
    states = _run_cells(config, parent, root)
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


def _reason(state: State) -> str:
    """Why a cell failed, on one line: its exception, else Prefect's state message."""
    try:
        error = state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001 - a pool worker's result may not be readable here
        error = None
    text = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else state.message or state.name
    return " ".join(str(text).split())


def _run_cells(config: CampaignConfig, parent: str, root: str) -> dict[str, State]:
    """Final state of every cell, by name; a failing cell does not stop the others."""
    settings = config.campaign
    if settings.executor == "pool":
        return _run_on_pool(config, parent)
    return {
        cells.cell_name(cell): prune_cell(cell, config.eval, settings, parent, root, return_state=True)
        for cell in config.cells()
    }


def _run_on_pool(config: CampaignConfig, parent: str) -> dict[str, State]:
    """Submit every cell to the work pool behind ``settings.deployment`` and wait for all.

    Each submission waits in its own thread; the context copy keeps each cell's flow run a
    child of this campaign's in the Prefect UI.
    """
    from prefect.deployments import run_deployment

    def submit(cell):
        # No root: a worker runs in its own checkout (the deployment's working directory).
        run = run_deployment(config.campaign.deployment, timeout=None, parameters={
            "cell": cell.model_dump(), "evaluation": config.eval.model_dump(),
            "settings": config.campaign.model_dump(), "parent_run_id": parent})
        return run.state

    with ThreadPoolExecutor(max_workers=len(config.cells())) as pool:
        futures = {cells.cell_name(c): pool.submit(contextvars.copy_context().run, submit, c) for c in config.cells()}
        return {name: future.result() for name, future in futures.items()}


def _baseline(model: str, config: CampaignConfig, parent: str | None) -> dict:
    """The dense model evaluated like the cells, as its own MLflow run (when tracked)."""
    name, evaluation, out = f"{cells.model_slug(model)}-dense", config.eval, Path(config.campaign.out)
    source = resolve_model(model)
    metrics = cells.metrics(model, evaluation, out / "metrics" / f"{name}.json", name, source.digest,
                            trust_remote_code=bool(config.prune.get("trust_remote_code")),
                            allow_pickle=bool(config.prune.get("allow_pickle")))
    if parent:
        log_cell(parent, name, params=flatten({"prune": {"model": model}, "eval": evaluation.model_dump()}),
                 metrics=cell_metrics(metrics),
                 artifacts=[str(out / "metrics" / f"{name}.json")],
                 tags={"kind": "baseline", "model_digest": source.digest}, run_key=f"{name}:{metrics['key']}")
    return {"name": name, "model": model, "metrics": metrics}


@flow(name="nightly-campaign", flow_run_name="nightly-{params}")
def campaign_from_params(params: str = "params.yaml", overrides: dict | None = None) -> dict:
    """The campaign of a ``params.yaml`` (with dotted-key ``overrides``): the entry point of the
    scheduled deployment in ``prefect.yaml``, run in the deployment's working directory."""
    from neuroal.config import load_campaign

    return campaign(load_campaign(Path(params), **(overrides or {})), root=".")
