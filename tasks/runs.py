"""Reading runs back from MLflow: a campaign's runs, a run's tags and artifacts (``neuroal report``,
``neuroal pull --run``, the scheduled benchmark).

Plain functions, not tasks: the report runs outside any flow and needs no task-run bookkeeping (nor
a temporary Prefect server). They share the client and its errors with the writers in
``tasks.tracking``; a store that does not exist is refused rather than created empty.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from neuroal.errors import UserError
from tasks.tracking import SEARCH_PAGE, TRACKING_URI_ENV, is_connection_error, mlflow_client, redact_url, tracking_uri

logger = logging.getLogger(__name__)


def experiment_runs(experiment: str) -> list[dict]:
    """Every run of an MLflow experiment as a plain dict.

    Returns:
        Dicts with ``run_id``, ``name``, ``status``, ``start_time`` and ``end_time`` (ms since the
        epoch, 0 when unset), ``params``, ``metrics``, ``tags`` and ``parent_run_id`` (None for a
        campaign's parent run).

    Raises:
        UserError: The tracking store or the experiment does not exist.
    """
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    uri = tracking_uri()
    _require_store(uri)
    with mlflow_client(f"reading experiment {experiment!r}") as client:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise UserError(f"MLflow experiment {experiment!r} does not exist in {redact_url(uri)}")
        runs, token = [], None
        while True:
            page = client.search_runs([found.experiment_id], max_results=SEARCH_PAGE, page_token=token)
            runs += page
            if not (token := page.token):
                break
    return [{"run_id": r.info.run_id, "name": r.info.run_name, "status": r.info.status,
             "start_time": r.info.start_time or 0, "end_time": r.info.end_time or 0,
             "params": dict(r.data.params), "metrics": dict(r.data.metrics), "tags": dict(r.data.tags),
             "parent_run_id": r.data.tags.get(MLFLOW_PARENT_RUN_ID)} for r in runs]


def read_json_artifact(run_id: str, path: str):
    """A run's JSON artifact, or None when it is missing or unreadable."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            return json.loads(download_artifact(run_id, path, Path(tmp)).read_text())
        except (FileNotFoundError, ValueError) as exc:
            logger.warning("run %s has no readable %s (%s)", run_id, path, exc)
            return None


def download_artifact(run_id: str, path: str, folder: Path) -> Path:
    """Download a run's artifact into ``folder``; raises ``FileNotFoundError`` when it is missing."""
    from mlflow.exceptions import MlflowException

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per small file is noise
    with mlflow_client(f"reading {path} of run {run_id}") as client:
        try:
            return Path(client.download_artifacts(run_id, path, str(folder)))
        except (MlflowException, OSError) as exc:
            if is_connection_error(exc):
                raise
            raise FileNotFoundError(f"run {run_id} has no artifact {path} ({exc})") from exc


def run_tags(run_id: str) -> dict[str, str]:
    """A run's tags; ``UserError`` when the tracking store has no such run."""
    from mlflow.exceptions import MlflowException

    _require_store(tracking_uri())
    with mlflow_client(f"reading run {run_id}") as client:
        try:
            return dict(client.get_run(run_id).data.tags)
        except MlflowException as exc:
            if is_connection_error(exc):
                raise
            raise UserError(f"MLflow run {run_id} does not exist in {redact_url(tracking_uri())}") from None


def _require_store(uri: str) -> None:
    """Refuse a local store that does not exist: MLflow would create an empty one."""
    parts = urlsplit(uri)
    if parts.scheme == "sqlite":
        path = parts.path[1:]  # SQLAlchemy: sqlite:///relative.db, sqlite:////absolute.db
    elif parts.scheme in ("", "file"):
        path = parts.path
    else:
        return  # a server: a missing experiment is reported by name
    if path and not Path(path).exists():
        raise UserError(f"no MLflow store at {path}: run a campaign here first or set {TRACKING_URI_ENV}")
