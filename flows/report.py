"""The campaign report: the latest campaign of an MLflow experiment read back from its runs and
rendered (by ``neuroal.report``, ``neuroal.history`` and ``neuroal.plots``) as ``report.md``, a
self-contained ``report.html`` and PNG plots in one folder, also logged to the campaign's parent
run under ``report/``.

The grid is the latest campaign's (its parent run's ``prune.*`` params). Each cell is the latest
finished run of the same configuration (grid point, shared ``prune.*`` and ``eval.*`` params)
under any campaign of the experiment, so a rerun that served cells from its caches and one that
retried only the failed cells both report every cell. A cell with no such run reads "failed"
("running" while the campaign run is still open).

The history is each of the last campaigns as it logged its own runs: there a cell with no finished
run of that campaign failed, and the regression gate compares the latest two.
"""

from __future__ import annotations

from datetime import datetime, timezone
from functools import partial
from pathlib import Path

from neuroal.checkpoint import MANIFEST, Manifest
from neuroal.config import GRID_AXES, CampaignConfig
from neuroal.errors import UserError
from neuroal.files import staged_folder
from neuroal.history import DEFAULT_HISTORY, regressions
from neuroal.plots import (
    plot_block_sparsity_profiles,
    plot_history,
    plot_perplexity_vs_sparsity,
)
from neuroal.pruning.plugin import Figures
from neuroal.pruning.registry import ALLOCATORS
from neuroal.report import markdown_to_html, render_markdown
from tasks.cells import grid_cell_name, model_slug
from tasks.runs import experiment_runs, read_json_artifact
from tasks.tracking import CAMPAIGN_CONFIG, ENVIRONMENT_TAG, log_folder, redact_url, tracking_uri

REPORT_MD, REPORT_HTML = "report.md", "report.html"
ARTIFACT_PATH = "report"  # where the report goes in the parent run's artifacts


def read_report(experiment: str, history: int = DEFAULT_HISTORY) -> dict:
    """The report of ``experiment``'s latest campaign, with the ``history`` of its last campaigns
    (the latest included) as :mod:`neuroal.history` reads them."""
    runs = experiment_runs(experiment)
    parents = sorted((r for r in runs if r["parent_run_id"] is None and _is_campaign(r)), key=lambda r: r["start_time"])
    if not parents:
        raise UserError(f"MLflow experiment {experiment!r} has no campaign run (run `neuroal campaign` first)")
    latest = _campaign_config(parents[-1])
    report = _latest_campaign(experiment, parents[-1], latest, runs)
    report["history"] = []
    if history:  # the earlier campaigns that logged their configuration (older neuroal did not)
        earlier = [(p, config) for p in parents[-history:-1] if (config := _campaign_config(p, required=False))]
        report["history"] = [_campaign_history(p, config, runs) for p, config in [*earlier, (parents[-1], latest)]]
    return report


def write_report(report: dict, out: Path) -> Path:
    """Write the report folder ``out`` (replacing an older report atomically) and log it to the
    campaign's parent run; returns the HTML file's path.

    Raises:
        UserError: ``out`` cannot be written.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"cannot write the report to {out}: it exists and is not a folder")
    try:
        with staged_folder(out) as folder:
            _write_files(report, folder)
    except OSError as exc:
        raise UserError(f"cannot write the report to {out}: {exc.strerror or exc}") from None
    log_folder(report["campaign"]["run_id"], out, ARTIFACT_PATH)
    return out / REPORT_HTML


def report_regressions(report: dict, pct: float) -> list[str]:
    """The latest campaign's regressions against the one before (``neuroal.history.regressions``)."""
    history = report["history"]
    return regressions(history[-2] if len(history) > 1 else None, history[-1], pct) if history else []


def _latest_campaign(experiment: str, parent: dict, config: CampaignConfig, runs: list[dict]) -> dict:
    """The latest campaign as the plain dict :func:`neuroal.report.render_markdown` takes (without
    ``figures`` and ``history``)."""
    children = [r for r in runs if r["parent_run_id"] and r["status"] == "FINISHED"]
    shared = _shared_settings(parent)
    missing = "running" if parent["status"] == "RUNNING" else "failed"
    cells = [_cell(point, children, shared, missing) for point in _grid(config)]
    baselines = [_baseline(model, children, shared, missing) for model in config.models()] if config.campaign.baseline else []
    return {
        "experiment": experiment, "tracking_uri": redact_url(tracking_uri()),
        "campaign": {"run_id": parent["run_id"], "status": parent["status"], "started": _utc(parent["start_time"]),
                     "git_revision": parent["tags"].get("git_revision"), "settings": _displayed(shared, config)},
        "corpora": list(config.eval.ppl), "tasks": list(config.eval.tasks),
        "cells": cells, "baselines": baselines,
    }


def _campaign_history(parent: dict, config: CampaignConfig, runs: list[dict]) -> dict:
    """One campaign as :mod:`neuroal.history` reads it: the runs it logged itself, by cell."""
    mine = {}
    for run in sorted((r for r in runs if r["parent_run_id"] == parent["run_id"] and r["status"] == "FINISHED"),
                      key=lambda r: r["end_time"]):
        mine[run["name"]] = run  # the latest of a name
    missing = "running" if parent["status"] == "RUNNING" else "failed"
    entries = [(f"{model_slug(m)}-dense", {"model": m, "method": None, "top_up": None, "sparsity": 0.0})
               for m in config.models()] if config.campaign.baseline else []
    entries += [(grid_cell_name(**point), point) for point in _grid(config)]
    cells = []
    for name, point in entries:
        run = mine.get(name)
        cells.append({**point, "name": name, "status": "finished" if run else missing,
                      "metrics": _nested_metrics(run["metrics"]) if run else None,
                      "settings": {k: v for k, v in run["params"].items() if k.startswith("eval.")} if run else None})
    return {"run_id": parent["run_id"], "started": _utc(parent["start_time"]), "status": parent["status"],
            "git_revision": parent["tags"].get("git_revision"),
            "environment": {k.removeprefix(f"{ENVIRONMENT_TAG}."): v for k, v in parent["tags"].items()
                            if k.startswith(f"{ENVIRONMENT_TAG}.")},
            "cells": cells}


def _shared_settings(parent: dict) -> dict:
    """The campaign's params that every cell shares: ``eval.*`` and the ``prune.*`` off the grid axes."""
    return {k: v for k, v in parent["params"].items()
            if k.startswith("eval.") or (k.startswith("prune.") and k.removeprefix("prune.") not in GRID_AXES)}


def _displayed(shared: dict, config: CampaignConfig) -> dict:
    """The shared settings worth a reader's eye: without unset values and without the options of
    allocators that no cell of the grid runs (the grid logs every allocator's)."""
    others = tuple(f"prune.{name}_" for name in ALLOCATORS if name not in config.prune.top_up)
    return {k: v for k, v in shared.items() if v != "None" and not k.startswith(others)}


def _campaign_config(parent: dict, required: bool = True) -> CampaignConfig | None:
    """The campaign's configuration, as logged by ``start_campaign`` (``campaign.json``); when not
    ``required``, None for a campaign without one (an older neuroal's)."""
    logged = read_json_artifact(parent["run_id"], CAMPAIGN_CONFIG)
    if logged is None and not required:
        return None
    if logged is None:
        raise UserError(f"campaign run {parent['run_id']} has no readable {CAMPAIGN_CONFIG} (made by an older "
                        "neuroal?); run the campaign again")
    return CampaignConfig.model_validate(logged)


def _is_campaign(run: dict) -> bool:
    """A campaign's parent run: it records the grid (a run started by hand in the experiment does not)."""
    return all(f"prune.{axis}" in run["params"] for axis in GRID_AXES)


def _grid(config: CampaignConfig) -> list[dict]:
    """The grid points of a campaign, in the campaign's order (models outermost)."""
    return [{axis: getattr(cell, axis) for axis in GRID_AXES} for cell in config.cells()]


def _cell(point: dict, children: list[dict], shared: dict, missing: str) -> dict:
    """One grid point: the latest finished cell run of its configuration, or ``missing``."""

    def same(run: dict) -> bool:
        p = run["params"]
        return (run["tags"].get("kind") == "cell" and all(p.get(k) == v for k, v in shared.items())
                and all(p.get(f"prune.{a}") == point[a] for a in GRID_AXES if a != "sparsity")
                and _float(p.get("prune.sparsity")) == point["sparsity"])

    entry = {**point, "name": grid_cell_name(**point)}
    run = _latest([r for r in children if same(r)])
    if run is None:
        return {**entry, "status": missing, "metrics": None}
    metrics = run["metrics"]
    return {**entry, **_run_fields(run), "achieved_sparsity": metrics.get("achieved_sparsity"),
            "timings": {k.removeprefix("time."): v for k, v in metrics.items() if k.startswith("time.")},
            "manifest": _manifest_summary(read_json_artifact(run["run_id"], MANIFEST))}


def _baseline(model: str, children: list[dict], shared: dict, missing: str) -> dict:
    """The latest finished dense-baseline run of ``model`` with the campaign's evaluation settings."""
    evaluation = {k: v for k, v in shared.items() if k.startswith("eval.")}
    run = _latest([r for r in children if r["tags"].get("kind") == "baseline" and r["params"].get("prune.model") == model
                   and all(r["params"].get(k) == v for k, v in evaluation.items())])
    return {"model": model, **_run_fields(run)} if run else {"model": model, "status": missing, "metrics": None}


def _run_fields(run: dict) -> dict:
    return {"status": "finished", "metrics": _nested_metrics(run["metrics"]), "run_id": run["run_id"],
            "campaign_run_id": run["parent_run_id"]}


def _latest(runs: list[dict]) -> dict | None:
    return max(runs, key=lambda r: (r["end_time"], r["start_time"]), default=None)


def _nested_metrics(flat: dict) -> dict:
    """``ppl.<corpus>`` and ``tasks.<task>.<metric>`` back to ``{"ppl": {...}, "tasks": {task: {...}}}``."""
    nested = {"ppl": {}, "tasks": {}}
    for key, value in flat.items():
        if key.startswith("ppl."):
            nested["ppl"][key.removeprefix("ppl.")] = value
        elif key.startswith("tasks."):
            task, _, metric = key.removeprefix("tasks.").rpartition(".")
            nested["tasks"].setdefault(task, {})[metric] = value
    return nested


def _manifest_summary(logged: dict | None) -> dict | None:
    """What the plots read from ``neuroal.json``; the per-row sparsities (megabytes) are dropped."""
    if not logged:
        return None
    manifest = Manifest.model_validate(logged)
    figures = ALLOCATORS[manifest.top_up].figures if manifest.top_up in ALLOCATORS else None
    return {"target_sparsity": manifest.target_sparsity, "block_sparsity": manifest.block_sparsity,
            "module_sparsity": manifest.module_sparsity, "summary": manifest.summary,
            "allocation": figures.report_details(manifest.allocation) if figures else {}}


def _write_files(report: dict, folder: Path) -> None:
    """The plots, ``report.md`` and ``report.html`` into ``folder``."""
    report = {**report, "figures": _plot_figures(report, folder)}
    markdown = render_markdown(report)
    (folder / REPORT_MD).write_text(markdown, encoding="utf-8")
    images = {f["file"]: (folder / f["file"]).read_bytes() for f in report["figures"]}
    page = markdown_to_html(markdown, images, title=f"Campaign report: {report['experiment']}")
    (folder / REPORT_HTML).write_text(page, encoding="utf-8")


def _plot_figures(report: dict, folder: Path) -> list[dict]:
    """Three figures per model x method (those with something to show), and a history figure per
    model (``history: True``), as PNGs in ``folder``."""
    figures = []
    for model in dict.fromkeys(c["model"] for c in report["cells"]):
        file, title = f"{model_slug(model)}-history.png", f"{model}: the last campaigns"
        if len(report.get("history", [])) > 1 and plot_history(report["history"], model, report["corpora"], folder / file, title):
            figures.append({"model": model, "title": title, "file": file, "history": True})
    for model, method in dict.fromkeys((c["model"], c["method"]) for c in report["cells"]):
        cells = [c for c in report["cells"] if (c["model"], c["method"]) == (model, method)]
        baselines = [b for b in report["baselines"] if b["model"] == model]
        plots = [
            ("perplexity", "perplexity against sparsity",
             partial(plot_perplexity_vs_sparsity, cells, baselines, report["corpora"])),
            ("block-sparsity", "achieved sparsity per decoder block", partial(plot_block_sparsity_profiles, cells)),
            *[(name, figures.title, partial(figures.report, [c for c in cells if c["top_up"] == name]))
              for name, figures in _allocator_figures(cells)],
        ]
        for kind, what, plot in plots:
            file, title = f"{model_slug(model)}-{method}-{kind}.png", f"{model}, {method}: {what}"
            if plot(folder / file, title):
                figures.append({"model": model, "title": title, "file": file})
    return figures


def _allocator_figures(cells: list[dict]) -> list[tuple[str, Figures]]:
    """The figures of the allocators these cells ran (``Allocator.figures``), by allocator name."""
    names = dict.fromkeys(c["top_up"] for c in cells)
    return [(name, ALLOCATORS[name].figures) for name in names if name in ALLOCATORS and ALLOCATORS[name].figures]


def _float(text: str | None) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _utc(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
