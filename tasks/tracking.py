"""MLflow tracking as thin Prefect tasks: one parent run per campaign, one nested run per cell.

Every call goes through an explicit ``MlflowClient`` bound to :func:`tracking_uri`, never through
MLflow's fluent active-run stack, so cells can be logged from worker threads and processes.
Storage and network tasks retry with backoff; when the server stays unreachable the final error
names it. Reading runs back is in ``tasks.runs``, which shares this module's client and errors.
"""

from __future__ import annotations

import logging
import numbers
import os
import posixpath
import re
import time
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from prefect import task
from prefect.cache_policies import NO_CACHE

logger = logging.getLogger(__name__)

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
RUN_KEY_TAG = "run_key"
CAMPAIGN_CONFIG = "campaign.json"  # the parent run's artifact: the campaign's configuration
ENVIRONMENT_TAG = "environment"  # the parent run's tags environment.<library>, environment.device
# Key paths that look like credentials are never logged (as params or tags).
_SECRET = re.compile(r"secret|passw|credential|key_id|access_key|api_?key|token(?!s|iz)", re.IGNORECASE)
# Prefect's retries (below) are the retry layer; MLflow's own HTTP retries (7 with backoff, minutes
# per call by default) would multiply them, so they are kept short unless the user set them.
_MLFLOW_HTTP_RETRIES = "2"
# Network and storage faults are transient: retry three times, waiting 1, 4 then 16 seconds.
NETWORK = {"retries": 3, "retry_delay_seconds": [1, 4, 16], "cache_policy": NO_CACHE}
# MLflow names allow word characters, / . - and space (colons only off Windows).
_INVALID_KEY = re.compile(r"[^/\w.\- ]")
SEARCH_PAGE = 1000  # runs per search page (MLflow's maximum for one request is larger; this is plenty)


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking server could not be reached."""


def tracking_uri() -> str:
    """The tracking URI: ``MLFLOW_TRACKING_URI``, else ``mlflow.db`` (SQLite) in the working folder."""
    return os.environ.get(TRACKING_URI_ENV) or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def flatten(d: Mapping, prefix: str = "") -> dict:
    """Flatten nested mappings to dotted key paths; lists and tuples become comma-joined strings.

    Args:
        d: A (possibly nested) mapping, e.g. ``{"prune": {"sparsity": 0.5, "ppl": ["a", "b"]}}``.
        prefix: Key path prepended to every key (without the trailing dot).

    Returns:
        ``{"prune.sparsity": 0.5, "prune.ppl": "a,b"}``. Already flat input comes back unchanged.
    """
    flat = {}
    for key, value in d.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, path))
        elif isinstance(value, (list, tuple)):
            flat[path] = ",".join(str(v) for v in value)
        else:
            flat[path] = value
    return flat


def is_secret(key_path: str) -> bool:
    """Whether a key path names a credential (secret, password, token, key id, access key)."""
    return bool(_SECRET.search(key_path))


@task(name="mlflow-start-campaign", **NETWORK)
def start_campaign(experiment: str, config: dict, artifact_location: str | None = None,
                   tags: dict | None = None) -> str:
    """Create the experiment if needed and start the campaign's parent run.

    Args:
        experiment: MLflow experiment name.
        config: The campaign configuration, nested; logged as dotted-key params (for the UI and
            search) and whole as the artifact ``campaign.json`` (what the report reads back, typed).
        artifact_location: Artifact root for a *new* experiment, e.g. ``s3://bucket/mlflow``
            (uploads go through boto3; ``MLFLOW_S3_ENDPOINT_URL`` points at a non-AWS server).
        tags: Run tags, e.g. ``{"git_revision": ...}``.

    Returns:
        The parent run id. The run stays open until :func:`finish_campaign`.
    """
    with mlflow_client("starting the campaign run") as client:
        experiment_id = _experiment_id(client, experiment, artifact_location)
        run = client.create_run(experiment_id, run_name=experiment, tags=_clean_tags(tags or {}))
        _log(client, run.info.run_id, config, {})
        client.log_dict(run.info.run_id, _without_secrets(config), CAMPAIGN_CONFIG)
        logger.info("MLflow campaign run %s in experiment %r", run.info.run_id, experiment)
        return run.info.run_id


@task(name="mlflow-log-cell", **NETWORK)
def log_cell(parent_run_id: str, name: str, params: dict, metrics: dict, artifacts: Iterable[str | Path] = (),
             tags: dict | None = None, run_key: str | None = None) -> str:
    """Log one cell as a finished run nested under the campaign's parent run.

    Args:
        parent_run_id: The run id returned by :func:`start_campaign`.
        name: Run name (the cell name).
        params: Cell configuration, nested or flat; logged as dotted key paths.
        metrics: Nested numbers (``{"ppl": {"wikipedia": 27.1}}`` -> ``ppl.wikipedia``); None and
            non-numeric values are skipped.
        artifacts: Files and folders to upload; missing ones are skipped with a warning.
        tags: Run tags, e.g. ``git_revision``, ``dvc_hash``, ``checkpoint``.
        run_key: Identity of this result. If a finished run with this key already exists under the
            parent, its id is returned and nothing is logged again.

    Returns:
        The nested run's id.
    """
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    with mlflow_client(f"logging cell {name!r}") as client:
        experiment_id = client.get_run(parent_run_id).info.experiment_id
        if run_key and (existing := _finished_run(client, experiment_id, parent_run_id, run_key)):
            logger.info("cell %s already logged as MLflow run %s", name, existing)
            return existing
        # The parent tag is what mlflow.start_run(parent_run_id=...) sets; set here it needs no
        # active run, so worker threads and other processes can log cells.
        run_tags = {**_clean_tags(tags or {}), MLFLOW_PARENT_RUN_ID: parent_run_id}
        if run_key:
            run_tags[RUN_KEY_TAG] = run_key
        run_id = client.create_run(experiment_id, run_name=name, tags=run_tags).info.run_id
        try:
            _log(client, run_id, params, metrics)
            _upload(client, run_id, artifacts)
        except BaseException:
            _terminate_quietly(client, run_id)  # a half-logged run must not look like a result
            raise
        client.set_terminated(run_id, "FINISHED")
        return run_id


@task(name="mlflow-finish-campaign", **NETWORK)
def finish_campaign(run_id: str, status: str = "FINISHED") -> None:
    """End the campaign's parent run.

    Args:
        run_id: The run id returned by :func:`start_campaign`.
        status: ``FINISHED``, ``FAILED`` or ``KILLED``.
    """
    with mlflow_client("finishing the campaign run") as client:
        client.set_terminated(run_id, status)


def set_run_tag(run_id: str, key: str, value: str) -> None:
    """Tag a run (finished or not); a value over MLflow's limit is cut to it."""
    from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

    with mlflow_client(f"tagging run {run_id}") as client:
        client.set_tag(run_id, key, value[:MAX_TAG_VAL_LENGTH])


def log_folder(run_id: str, folder: str | Path, artifact_path: str) -> None:
    """Upload a folder's files to a run (finished or not) under ``artifact_path``."""
    with mlflow_client(f"logging {artifact_path} to run {run_id}") as client:
        client.log_artifacts(run_id, str(folder), artifact_path=artifact_path)


@contextmanager
def mlflow_client(what: str):
    """An ``MlflowClient`` for :func:`tracking_uri`; a connection failure becomes a clear error.
    Every MLflow call goes through it, writers here and readers in ``tasks.runs``."""
    from mlflow import MlflowClient

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", _MLFLOW_HTTP_RETRIES)
    uri = tracking_uri()
    try:
        yield MlflowClient(tracking_uri=uri)
    except Exception as exc:
        if not is_connection_error(exc):
            raise
        raise TrackingUnavailable(
            f"MLflow tracking server {redact_url(uri)} is unreachable while {what}: {_root_cause(exc)}. "
            f"Start the server or point {TRACKING_URI_ENV} at a running one."
        ) from exc


def _experiment_id(client, name: str, artifact_location: str | None) -> str:
    """Id of experiment ``name``, created with ``artifact_location`` if it does not exist."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException:  # another process created it first
            if (experiment := client.get_experiment_by_name(name)) is None:
                raise
    if artifact_location and experiment.artifact_location.rstrip("/") != artifact_location.rstrip("/"):
        logger.warning("experiment %r keeps its artifact location %s (not %s)", name,
                       experiment.artifact_location, artifact_location)
    return experiment.experiment_id


def _finished_run(client, experiment_id: str, parent_run_id: str, run_key: str) -> str | None:
    """Id of a finished run under ``parent_run_id`` tagged with ``run_key``, if any."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    # The key is compared here rather than in the filter: filter strings cannot quote every key.
    query = f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}' and attributes.status = 'FINISHED'"
    token = None
    while True:
        page = client.search_runs([experiment_id], query, max_results=SEARCH_PAGE, page_token=token)
        for run in page:
            if run.data.tags.get(RUN_KEY_TAG) == run_key:
                return run.info.run_id
        if not (token := page.token):
            return None


def _log(client, run_id: str, params: Mapping, metrics: Mapping) -> None:
    """Log flattened params (credentials dropped) and numeric metrics in batches MLflow accepts."""
    from mlflow.entities import Metric, Param
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

    now = int(time.time() * 1000)
    param_list = [Param(_key(k), _param_value(v, MAX_PARAM_VAL_LENGTH)) for k, v in flatten(params).items()
                  if not _dropped(k)]
    metric_list = [Metric(_key(k), float(v), now, 0) for k, v in flatten(metrics).items() if _is_number(v)]
    step = MAX_PARAMS_TAGS_PER_BATCH  # also under the metrics limit (1000 per batch)
    for i in range(0, max(len(param_list), len(metric_list)), step):
        client.log_batch(run_id, metrics=metric_list[i:i + step], params=param_list[i:i + step])


def _upload(client, run_id: str, artifacts: Iterable[str | Path]) -> None:
    """Upload files (to the artifact root) and folders (under their own name)."""
    for artifact in artifacts:
        path = Path(artifact)
        if path.is_dir():
            client.log_artifacts(run_id, str(path), artifact_path=path.name)
        elif path.is_file():
            client.log_artifact(run_id, str(path))
        else:
            logger.warning("artifact %s does not exist; not uploaded to run %s", path, run_id)


def _clean_tags(tags: Mapping) -> dict:
    """Tags as strings, without credential-looking keys."""
    return {k: str(v) for k, v in flatten(tags).items() if not _dropped(k)}


def _key(key: str) -> str:
    """A valid MLflow param/metric name: lm-eval's ``acc,none`` becomes ``acc_none``; a corpus path
    that MLflow would read as another path (``ppl.data/../x.txt``) loses its slashes."""
    key = _INVALID_KEY.sub("_", key)
    return key.replace("/", "_") if posixpath.normpath(key) != key else key


def _without_secrets(config: Mapping) -> dict:
    """``config`` less the keys that look like credentials, at any depth."""
    return {k: _without_secrets(v) if isinstance(v, Mapping) else v for k, v in config.items() if not _dropped(k)}


def _dropped(key: str) -> bool:
    if is_secret(key):
        logger.warning("not logging %s: it looks like a credential", key)
        return True
    return False


def _param_value(value, limit: int) -> str:
    text = str(value)
    if len(text) > limit:  # MLflow rejects longer values; a truncated one still identifies the run
        logger.warning("param value truncated to %d characters", limit)
        text = text[:limit]
    return text


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _terminate_quietly(client, run_id: str) -> None:
    try:
        client.set_terminated(run_id, "FAILED")
    except Exception:  # the original error is the one to report
        logger.debug("could not mark run %s failed", run_id, exc_info=True)


def is_connection_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or an error it was raised from) is a network connection failure."""
    import requests

    kinds = (ConnectionError, TimeoutError, requests.exceptions.ConnectionError, requests.exceptions.Timeout)
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kinds):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _root_cause(exc: BaseException) -> str:
    """The innermost error's message, short: MLflow's wrapper repeats the whole request URL."""
    while exc.__cause__ or exc.__context__:
        exc = exc.__cause__ or exc.__context__
    text = str(exc)
    match = re.search(r"\[Errno -?\d+\][^'\")]*", text)
    return match.group(0) if match else text[:300]


def redact_url(url: str) -> str:
    """``url`` without a user name or password, fit for messages and logs."""
    parts = urlsplit(url)
    if not parts.username and not parts.password:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))
