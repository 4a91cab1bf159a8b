"""One cell of a campaign: calibration -> prepare (the allocator's cached pre-stage) -> allocate ->
prune -> lineage form -> evaluate -> version (DVC tracks the lineage form, pushed to the remote when one is set) -> track
(MLflow). Also the deployment entry point of a Prefect work pool, so each step runs on the
worker's machine."""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run

from neuroal.checkpoint import Manifest
from neuroal.config import CampaignSettings, EvalConfig, PruneConfig
from neuroal.pipeline import Plan
from tasks import cells
from tasks.lineage import DVC_REMOTE_TAG
from tasks.tracking import flatten, log_cell
from tasks.versioning import dvc_file, dvc_push, dvc_track, git_revision, remote_url


def _run_name() -> str:
    return "prune-" + cells.cell_name(PruneConfig(**_param("cell")))


def _param(name: str):
    value = flow_run.parameters[name]
    return value.model_dump() if hasattr(value, "model_dump") else value


# persist_result: a campaign reads a cell's summary back from a work-pool worker's flow run.
@flow(name="prune-cell", flow_run_name=_run_name, persist_result=True)
def prune_cell(cell: PruneConfig, evaluation: EvalConfig, settings: CampaignSettings,
               parent_run_id: str | None = None, root: str = ".", refresh: cells.Refresh = cells.NO_REFRESH) -> dict:
    """Prune, evaluate, version and track one cell; returns its summary (paths, metrics, hashes).

    Every stage is skipped when its stored output still matches its inputs (and code), so a rerun
    of a finished cell does no pruning work; ``refresh`` names the stages recomputed all the same.
    """
    out, name = Path(settings.out), cells.cell_name(cell)
    cache = out / "cache"
    plan = Plan.of(cell)  # resolved once; every task gets it
    calibration = cells.calibration(plan, cache, refresh)
    cells.prepare(plan, calibration, cache, refresh)
    allocation = cells.allocate(plan, calibration, cache, refresh)
    # The full folder stays local (git-ignored, evaluated); DVC tracks its compact lineage form.
    checkpoint = cells.prune(plan, calibration, allocation, out / "checkpoints" / name, out / "lineage" / name, refresh)
    lineage = cells.lineage(plan, checkpoint, out / "lineage" / name)
    metrics = cells.evaluate(checkpoint.path, evaluation, out / "metrics" / f"{name}.json", name, checkpoint.digest,
                            trust_remote_code=cell.trust_remote_code, refresh=refresh)
    summary = {"name": name, "model": cell.model, "method": cell.method, "top_up": cell.top_up,
               "sparsity": cell.sparsity, "checkpoint": checkpoint.path, "lineage": lineage, "metrics": metrics,
               "dvc_hash": dvc_track(Path(lineage["path"]), Path(root)) if settings.dvc else None}
    pushed = settings.dvc and settings.dvc_remote
    if pushed:  # from the machine that holds the checkpoint
        dvc_push([Path(lineage["path"])], Path(root), settings.dvc_remote)
    if parent_run_id:
        # The .dvc file and the remote let `neuroal pull --run` restore the checkpoint anywhere.
        artifacts = [Path(checkpoint.path) / p for p in ("neuroal.json", "allocation.png")]
        artifacts += [out / "metrics" / f"{name}.json"] + ([dvc_file(Path(lineage["path"]))] if settings.dvc else [])
        summary["mlflow_run_id"] = log_cell(
            parent_run_id, name,
            params=flatten({"prune": cell.model_dump(mode="json"), "eval": evaluation.model_dump()}),
            metrics={**cell_metrics(metrics), "lineage": {k: lineage[k] for k in ("bytes", "dense_bytes")}},
            artifacts=[str(a) for a in artifacts],
            tags={"git_revision": git_revision(Path(root)) or "", "dvc_hash": summary["dvc_hash"] or "",
                  DVC_REMOTE_TAG: remote_url(settings.dvc_remote) if pushed else "",
                  "checkpoint": checkpoint.path, "lineage_form": lineage["form"], "kind": "cell"},
            run_key=f"{name}:{checkpoint.digest}:{metrics['key']}",
        )
    return summary


def cell_metrics(metrics: dict) -> dict:
    """What MLflow plots of a cell or dense baseline: perplexities, accuracies, achieved sparsity,
    the allocator's summary (its numbers: NeuroAl's lambdas, ATP's beta), stage times, and whether
    windows started with BOS (1) or not (0)."""
    manifest = Manifest.model_validate(metrics["checkpoint"]) if metrics.get("checkpoint") else None
    calibration = manifest.calibration if manifest else None
    bos = {"eval": metrics.get("bos_per_window"), "calibration": calibration.bos_per_window if calibration else None}
    return {"ppl": metrics["ppl"], "tasks": metrics["tasks"],
            "achieved_sparsity": manifest.achieved_sparsity if manifest else None,
            "summary": manifest.summary if manifest else {},  # log_cell keeps the numbers
            "bos_per_window": {k: int(v) for k, v in bos.items() if v is not None},
            "time": {**(manifest.timings if manifest else {}), **{f"eval.{k}": v for k, v in metrics["timings"].items()}}}
