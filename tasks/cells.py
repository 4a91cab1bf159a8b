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
import shutil
from dataclasses import dataclass
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict

from neuroal import RESULTS_VERSION, pipeline
from neuroal.checkpoint import MANIFEST, read_manifest
from neuroal.config import EvalConfig, PruneConfig, Stage
from neuroal.data import corpus_digest, load_calibration, save_calibration
from neuroal.digests import file_digest, json_digest, weight_files
from neuroal.environment import COMPUTE_LIBRARIES, TOKENIZING_LIBRARIES, compute_environment, library_versions
from neuroal.errors import UserError
from neuroal.evaluation import evaluate as evaluation
from neuroal.evaluation.evaluate import EvalSpec, evaluation_environment
from neuroal.files import write_json_atomic
from neuroal.lineage import is_lineage, materialize, read_lineage, write_lineage
from neuroal.pipeline import Plan
from neuroal.pruning import load_allocation, save_allocation

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


class Refresh(BaseModel):
    """Stages a campaign recomputes on purpose (``campaign.refresh``): their outputs written before
    the campaign started (``since``, POSIX time) are not reused. Outputs written since are, so the
    cells that share a stage's output (calibration windows, a prepared pre-stage) compute it once."""

    model_config = ConfigDict(frozen=True)

    stages: frozenset[Stage] = frozenset()
    since: float = 0.0

    def stale_before(self, stage: Stage) -> float:
        """The POSIX time before which ``stage``'s outputs are recomputed (0: any output is reused)."""
        return self.since if stage in self.stages else 0.0

    def reuses(self, stage: Stage, path: Path) -> bool:
        """Whether ``stage``'s output ``path`` exists and may be reused."""
        return Path(path).exists() and Path(path).stat().st_mtime >= self.stale_before(stage)


NO_REFRESH = Refresh()


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


@task(name="calibration", task_run_name="calibration-{plan.config.calib}-{plan.config.nsamples}x{plan.config.seqlen}",
      **COMPUTE)
def calibration(plan: Plan, cache: Path, refresh: Refresh = NO_REFRESH) -> Ref | None:
    """Draw (or reuse) the calibration windows of a cell; None when the cell reads no data."""
    if not plan.reads_data:
        return None
    c = plan.config
    spec = {"model": plan.source.digest, "corpus": c.calib, "corpus_digest": corpus_digest(c.calib),
            "bos_per_window": c.bos_per_window, "nsamples": c.nsamples, "seqlen": c.seqlen, "seed": c.seed,
            "code": library_versions(TOKENIZING_LIBRARIES)}
    path = Path(cache) / "calibration" / f"{json_digest(spec)[:32]}.safetensors"
    windows = load_calibration(path) if refresh.reuses("calibration", path) else None
    if windows is None:
        windows = pipeline.calibrate(plan)
        save_calibration(windows, path)
    return Ref(str(path), windows.digest)


@task(name="prepare", task_run_name="prepare-{plan.config.top_up}-{plan.config.method}", **COMPUTE)
def prepare(plan: Plan, calibration: Ref | None, cache: Path, refresh: Refresh = NO_REFRESH) -> Ref | None:
    """The allocator's cached pre-stage (``Allocator.prepare``: NeuroAl's dense statistics in dense
    mode), shared by every cell of its model and data; None when it has none."""
    path = pipeline.prepare(plan, _calibration(calibration), Path(cache) / "activations",
                            stale_before=refresh.stale_before("prepare"))
    return Ref(str(path), file_digest(path)) if path else None


@task(name="allocate", task_run_name="allocate-{plan.config.top_up}-s{plan.config.sparsity}", **COMPUTE)
def allocate(plan: Plan, calibration: Ref | None, cache: Path, refresh: Refresh = NO_REFRESH) -> Ref:
    """The allocator's targets (NeuroAl's search, OWL's ratios, ...), stored for the prune task."""
    key = json_digest({"config": plan.config.model_dump(mode="json"), "model": plan.source.digest,
                       "calibration": calibration.digest if calibration else None, "results": RESULTS_VERSION,
                       "environment": compute_environment(plan.device, plan.dtype)})
    path = Path(cache) / "allocations" / f"{key[:32]}.safetensors"
    if not (refresh.reuses("allocate", path) and load_allocation(path) is not None):
        save_allocation(path, pipeline.allocate(plan, _calibration(calibration), Path(cache) / "activations"))
    return Ref(str(path), key)


@task(name="prune", task_run_name="prune-{plan.config.method}-{plan.config.top_up}-s{plan.config.sparsity}", **COMPUTE)
def prune(plan: Plan, calibration: Ref | None, allocation: Ref, out: Path, lineage: Path,
          refresh: Refresh = NO_REFRESH) -> Ref:
    """The cell's full checkpoint folder ``out``: kept if it matches, else rebuilt from the cell's
    lineage form ``lineage`` if that matches (``dvc pull`` brought it, the folder was deleted), else
    pruned with the stored allocation."""
    out, form = Path(out), Path(lineage)
    if _checkpoint_matches(out, plan, calibration) and refresh.reuses("prune", out / MANIFEST):
        logger.info("checkpoint %s is up to date", out)
    elif _lineage_matches(form, plan, calibration) and refresh.reuses("prune", form / MANIFEST):
        logger.info("rebuilding checkpoint %s from its lineage form %s", out, form)
        shutil.rmtree(out, ignore_errors=True)
        materialize(form, out, plan.source)
    else:
        stored = load_allocation(Path(allocation.path))
        if stored is None:
            raise RuntimeError(f"allocation {allocation.path} is missing or corrupt; rerun the campaign")
        pipeline.prune_to_checkpoint(plan, out, overwrite=True, calibration=_calibration(calibration), allocation=stored)
    return Ref(str(out), json_digest(read_manifest(out).files))


@task(name="lineage", task_run_name="lineage-{plan.config.method}-{plan.config.top_up}-s{plan.config.sparsity}",
      **COMPUTE)
def lineage(plan: Plan, checkpoint: Ref, out: Path) -> dict:
    """The compact lineage form of the cell's checkpoint, which DVC tracks instead of its weights
    (kept if it is the form of this very checkpoint). Returns its path, form and size in bytes
    against the dense source's weight files."""
    out, folder = Path(out), Path(checkpoint.path)
    try:
        current = is_lineage(out) and (out / MANIFEST).read_bytes() == (folder / MANIFEST).read_bytes()
        recorded = read_lineage(out) if current else None
    except UserError as exc:
        logger.warning("%s; writing it again", exc)
        recorded = None
    if recorded is None:
        recorded = write_lineage(folder, plan.source, out)
    return {"path": str(out), "form": recorded.form, "bytes": folder_bytes(out),
            "dense_bytes": sum(p.stat().st_size for p in weight_files(plan.source.folder))}


def folder_bytes(folder: Path) -> int:
    """The size of a folder's files, in bytes."""
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())


@task(name="evaluate", task_run_name="evaluate-{name}", **COMPUTE)
def evaluate(model: str, settings: EvalConfig, out: Path, name: str, model_digest: str,
             trust_remote_code: bool = False, allow_pickle: bool = False, refresh: Refresh = NO_REFRESH) -> dict:
    """Perplexity and zero-shot metrics of a model or checkpoint, stored as JSON beside it.

    ``model_digest`` names the weights evaluated (checkpoint files or source model): a metrics file
    made from other weights, other settings or other code is recomputed. ``trust_remote_code`` and
    ``allow_pickle`` are the campaign's ``prune`` settings of the same names.
    """
    out = Path(out)
    spec = EvalSpec.of_campaign(model, settings, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    key = json_digest({"weights": model_digest, "eval": settings.model_dump(),
                       "corpora": {corpus: corpus_digest(corpus) for corpus in settings.ppl},
                       "environment": evaluation_environment(spec)})
    if refresh.reuses("evaluate", out):
        try:
            stored = json.loads(out.read_text())
            if stored.get("key") == key:
                return stored
        except (OSError, ValueError):
            pass  # unreadable: recompute
    measured = {"key": key, **evaluation.evaluate(spec)}
    write_json_atomic(out, measured)
    return measured


def _calibration(ref: Ref | None):
    if ref is None:
        return None
    calibration = load_calibration(Path(ref.path))
    if calibration is None or calibration.digest != ref.digest:
        raise RuntimeError(f"calibration {ref.path} is missing or changed; rerun the campaign")
    return calibration


def _checkpoint_matches(out: Path, plan: Plan, calibration: Ref | None) -> bool:
    """Whether ``out`` is a complete checkpoint of this very cell (config, model, calibration,
    and code, device kind and dtype that prune the same way)."""
    if not (out / MANIFEST).is_file():
        return False
    try:
        manifest = read_manifest(out)
    except UserError as exc:
        logger.warning("%s; pruning it again", exc)
        return False
    return _manifest_matches(manifest, plan, calibration)


def _lineage_matches(folder: Path, plan: Plan, calibration: Ref | None) -> bool:
    """Whether ``folder`` is an intact lineage form of a checkpoint of this very cell."""
    if not is_lineage(folder):
        return False
    try:
        read_lineage(folder)
        manifest = read_manifest(folder, verify=False)  # its weights are not here; the recipe names their digests
    except UserError as exc:
        logger.warning("%s; pruning again", exc)
        return False
    return _manifest_matches(manifest, plan, calibration)


def _manifest_matches(manifest, plan: Plan, calibration: Ref | None) -> bool:
    stored_calibration = manifest.calibration.digest if manifest.calibration else None
    return (manifest.config == plan.config.model_dump(mode="json") and manifest.source.digest == plan.source.digest
            and stored_calibration == (calibration.digest if calibration else None)
            and manifest.results_version == RESULTS_VERSION
            and _environment_of(manifest) == compute_environment(plan.device, plan.dtype))


def _environment_of(manifest) -> dict:
    """The ``compute_environment`` a checkpoint was pruned in, as its manifest records it."""
    return {**{name: manifest.versions.get(name) for name in COMPUTE_LIBRARIES},
            "device": manifest.device_kind, "dtype": manifest.dtype}
