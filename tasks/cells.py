"""Prefect tasks of a pruning cell. Each loads its inputs from paths, calls one ``neuroal``
function, writes its output to a path named by the digests of its inputs, and returns a small
reference.

Caching is by content, on disk: a task whose output file already exists and verifies (digests,
config) returns it without computing. Prefect's own result cache is off (``NO_CACHE``) because it
would return a reference to a file that has since been deleted or changed; ours re-checks the file.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from neuroal import RESULTS_VERSION
from neuroal.checkpoint import MANIFEST, read_manifest
from neuroal.config import EvalConfig, PruneConfig
from neuroal.data import corpus_digest, load_calibration, save_calibration
from neuroal.digests import json_digest
from neuroal.errors import UserError
from neuroal.files import write_json_atomic
from neuroal.models import resolve_model

logger = logging.getLogger(__name__)


def _not_user_error(task, task_run, state) -> bool:
    """Retry faults (I/O, network, out of memory), not bad input: that fails the same way again."""
    try:
        state.result()
    except UserError:
        return False
    except Exception:  # noqa: BLE001 - any other failure is worth another try
        return True
    return True


# Compute tasks retry once (a transient fault such as a lost GPU or a full disk that was cleaned);
# storage and network tasks (tasks/tracking.py, tasks/versioning.py) retry more, with backoff.
COMPUTE = dict(retries=1, retry_delay_seconds=5, retry_condition_fn=_not_user_error, cache_policy=NO_CACHE)


@dataclass(frozen=True)
class Ref:
    """A task's output: where it is and the digest that names its content."""

    path: str
    digest: str


def cell_name(config: PruneConfig) -> str:
    """``{model}-{method}-{top_up}-s{sparsity}``: the checkpoint folder and the Prefect/MLflow run name."""
    return grid_cell_name(config.model, config.method, config.top_up, config.sparsity)


def grid_cell_name(model: str, method: str, top_up: str, sparsity: float) -> str:
    """:func:`cell_name` of a grid point given by its axes."""
    return f"{model_slug(model)}-{method}-{top_up}-s{sparsity:g}"


def model_slug(spec: str) -> str:
    """A model spec as a file-name part (hub ids keep their ``org--name`` shape)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "--", spec.strip("/")).strip("-.") or "model"


@task(name="calibration", task_run_name="calibration-{config.calib}-{config.nsamples}x{config.seqlen}", **COMPUTE)
def prepare_calibration(config: PruneConfig, cache: Path) -> Ref | None:
    """Draw (or reuse) the calibration windows of a cell; None when the cell reads no data."""
    from neuroal.pipeline import calibrate, reads_calibration

    if not reads_calibration(config):
        return None
    source = resolve_model(config.model)
    spec = {"model": source.digest, "corpus": config.calib, "corpus_digest": corpus_digest(config.calib),
            "bos_per_window": config.bos_per_window, "nsamples": config.nsamples,
            "seqlen": config.seqlen, "seed": config.seed}
    path = Path(cache) / "calibration" / f"{json_digest(spec)[:32]}.safetensors"
    calibration = load_calibration(path)
    if calibration is None:
        calibration = calibrate(config)
        save_calibration(calibration, path)
    return Ref(str(path), calibration.digest)


@task(name="dense-activations", task_run_name="dense-activations-{config.method}", **COMPUTE)
def cache_dense_activations(config: PruneConfig, calibration: Ref | None, cache: Path) -> Ref | None:
    """The dense model's statistics on the search set, shared by every dense-mode NeuroAl cell."""
    from neuroal.digests import file_digest
    from neuroal.pipeline import cache_dense_activations as compute

    if calibration is None:
        return None
    path = compute(config, _calibration(calibration), Path(cache) / "activations")
    return Ref(str(path), file_digest(path)) if path else None


@task(name="allocate", task_run_name="allocate-{config.top_up}-s{config.sparsity}", **COMPUTE)
def allocate(config: PruneConfig, calibration: Ref | None, cache: Path) -> Ref:
    """The top-up's allocation (NeuroAl's search, OWL's ratios, ...), stored for the prune task."""
    from neuroal.pipeline import allocate as compute
    from neuroal.pruning import load_allocation, save_allocation

    key = json_digest({"config": config.model_dump(), "model": resolve_model(config.model).digest,
                       "calibration": calibration.digest if calibration else None, "results": RESULTS_VERSION})
    path = Path(cache) / "allocations" / f"{key[:32]}.safetensors"
    if load_allocation(path) is None:
        allocated = compute(config, _calibration(calibration), Path(cache) / "activations")
        save_allocation(path, allocated.allocation, {**allocated.details, "seconds": allocated.seconds})
    return Ref(str(path), key)


@task(name="prune", task_run_name="prune-{config.method}-{config.top_up}-s{config.sparsity}", **COMPUTE)
def prune(config: PruneConfig, calibration: Ref | None, allocation: Ref, out: Path) -> Ref:
    """Prune with the stored allocation and write the checkpoint folder (kept if it matches)."""
    from neuroal.pipeline import Allocated, prune_to_checkpoint
    from neuroal.pruning import load_allocation

    out = Path(out)
    source = resolve_model(config.model)
    if _checkpoint_matches(out, config, source.digest, calibration):
        logger.info("checkpoint %s is up to date", out)
    else:
        loaded = load_allocation(Path(allocation.path))
        if loaded is None:
            raise RuntimeError(f"allocation {allocation.path} is missing or corrupt; rerun the campaign")
        allocation_map, details = loaded
        seconds = details.pop("seconds", 0.0)
        prune_to_checkpoint(config, out, overwrite=True, calibration=_calibration(calibration),
                            allocated=Allocated(allocation_map, details, seconds))
    return Ref(str(out), json_digest(read_manifest(out)["files"]))


@task(name="evaluate", task_run_name="evaluate-{name}", **COMPUTE)
def evaluate(model: str, settings: EvalConfig, out: Path, name: str, model_digest: str,
             trust_remote_code: bool = False, allow_pickle: bool = False) -> dict:
    """Perplexity and zero-shot metrics of a model or checkpoint, stored as JSON beside it.

    ``model_digest`` names the weights evaluated (checkpoint files or source model): a metrics file
    made from other weights or other settings is recomputed. ``trust_remote_code`` and
    ``allow_pickle`` are the campaign's ``prune`` settings of the same names.
    """
    from neuroal.evaluation.evaluate import EvalSpec
    from neuroal.evaluation.evaluate import evaluate as compute

    out = Path(out)
    key = json_digest({"weights": model_digest, "eval": settings.model_dump(),
                       "corpora": {corpus: corpus_digest(corpus) for corpus in settings.ppl}})
    if out.is_file():
        try:
            stored = json.loads(out.read_text())
            if stored.get("key") == key:
                return stored
        except (OSError, ValueError):
            pass  # unreadable: recompute
    spec = EvalSpec.of_campaign(model, settings, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    metrics = {"key": key, **compute(spec)}
    write_json_atomic(out, metrics)
    return metrics


def _calibration(ref: Ref | None):
    if ref is None:
        return None
    calibration = load_calibration(Path(ref.path))
    if calibration is None or calibration.digest != ref.digest:
        raise RuntimeError(f"calibration {ref.path} is missing or changed; rerun the campaign")
    return calibration


def _checkpoint_matches(out: Path, config: PruneConfig, source_digest: str, calibration: Ref | None) -> bool:
    """Whether ``out`` is a complete checkpoint of this very cell (config, model, calibration,
    and code that prunes the same way)."""
    if not (out / MANIFEST).is_file():
        return False
    try:
        manifest = read_manifest(out)
    except UserError as exc:
        logger.warning("%s; pruning it again", exc)
        return False
    stored_calibration = (manifest.get("calibration") or {}).get("digest")
    return (manifest.get("config") == config.model_dump() and manifest["source"]["digest"] == source_digest
            and stored_calibration == (calibration.digest if calibration else None)
            and manifest.get("results_version") == RESULTS_VERSION)
