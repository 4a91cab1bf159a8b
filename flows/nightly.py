"""The scheduled benchmark (the ``nightly`` deployment of ``prefect.yaml``): the campaign of a
``params.yaml``, then its report with the history of the last campaigns, then the regression
gate. Prefect artifacts beside the flow run show the results table and link the MLflow run and
the report; when the gate trips, the flow run and the campaign's MLflow run are tagged
``regression`` and the flow run fails, naming every regressed cell.
"""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.campaign import CampaignFailed, campaign
from flows.cli import regression_line
from flows.report import read_report, report_regressions, write_report
from neuroal.history import DEFAULT_HISTORY
from neuroal.metrics import mean_accuracy
from tasks.tracking import redact_url, set_run_tag, tracking_uri

logger = logging.getLogger(__name__)

REGRESSION_TAG = "regression"
RESULTS_ARTIFACT, REPORT_ARTIFACT = "nightly-results", "nightly-report"


class RegressionFound(RuntimeError):
    """The gate tripped: a cell failed or got worse than in the previous campaign."""


@flow(name="nightly-campaign", flow_run_name="nightly-{params}")
def nightly(params: str = "params.yaml", overrides: dict | None = None, fail_on_regression: float | None = 5.0,
            history: int = DEFAULT_HISTORY) -> dict:
    """Run the campaign of ``params`` (with dotted-key ``overrides``) in the deployment's working
    directory, report it and gate it (``fail_on_regression``: percent of perplexity or points of
    accuracy, as ``neuroal report --fail-on-regression``; None: no gate)."""
    from neuroal.config import load_campaign

    config = load_campaign(Path(params), **(overrides or {}))
    try:
        results, failure = campaign(config, root="."), None
    except CampaignFailed as exc:  # the report and the gate still run: the failed cells are findings
        results, failure = None, exc
    report_and_gate(config.campaign.experiment, Path(config.campaign.out) / "report", fail_on_regression, history)
    if failure:
        raise failure
    return results


def report_and_gate(experiment: str, out: Path, fail_on_regression: float | None, history: int) -> None:
    """Inside a flow run: write the latest campaign's report, publish the artifacts, and raise
    ``RegressionFound`` (after tagging this flow run and the MLflow run) when the gate trips."""
    report = read_report(experiment, history)
    page = write_report(report, out)
    found = report_regressions(report, fail_on_regression) if fail_on_regression is not None else []
    _publish(report, page, found)
    if found:
        _tag_regression(report["campaign"]["run_id"], found)
        raise RegressionFound(regression_line(report, found))


def _publish(report: dict, page: Path, found: list[str]) -> None:
    """The results table (what this campaign logged itself: a cell it failed reads failed) and a
    markdown note with the links, as artifacts of this flow run."""
    corpora = report["corpora"]
    rows = []
    for cell in report["history"][-1]["cells"] if report["history"] else [*report["baselines"], *report["cells"]]:
        metrics = cell.get("metrics") or {}
        accuracy = mean_accuracy(metrics) if metrics else None
        rows.append({"cell": cell.get("name") or f"{cell['model']} dense", "status": cell["status"],
                     **{f"ppl {c}": _rounded((metrics.get("ppl") or {}).get(c)) for c in corpora},
                     "mean acc": _rounded(accuracy, 4)})
    create_table_artifact(rows, key=RESULTS_ARTIFACT, description=f"Campaign {report['campaign']['run_id']}: "
                          "perplexity per corpus and mean zero-shot accuracy of every cell")
    run_id = report["campaign"]["run_id"]
    lines = [f"# Campaign {report['experiment']}", "",
             f"- MLflow run: {_run_link(run_id)}",
             f"- Report: `{Path(page).resolve()}` (also the run's artifact `report/report.html`)",
             f"- Gate: {'**regression**: ' + '; '.join(found) if found else 'no regression'}"]
    create_markdown_artifact("\n".join(lines), key=REPORT_ARTIFACT, description="links to the campaign's MLflow run and report")


def _run_link(run_id: str) -> str:
    """A link to the MLflow run when the store is a server, else its id and store."""
    uri = redact_url(tracking_uri())
    if uri.startswith(("http://", "https://")):
        return f"[{run_id}]({uri.rstrip('/')}/#/runs/{run_id})"
    return f"`{run_id}` in `{uri}`"


def _tag_regression(run_id: str, found: list[str]) -> None:
    """Tag this flow run and the campaign's MLflow run ``regression``."""
    from prefect import get_client
    from prefect.runtime import flow_run

    set_run_tag(run_id, REGRESSION_TAG, "; ".join(found))
    if flow_run.id:
        with get_client(sync_client=True) as client:
            tags = client.read_flow_run(flow_run.id).tags
            client.update_flow_run(flow_run.id, tags=sorted({*tags, REGRESSION_TAG}))


def _rounded(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)
