"""``neuroal campaign`` and ``neuroal report``: registered into the ``neuroal`` command through the
``neuroal.commands`` entry point, so that the library never imports the orchestration."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import yaml

logger = logging.getLogger(__name__)

STAGE = "campaign"  # the dvc.yaml stage that runs `neuroal campaign --params params.yaml`
EXIT_REGRESSION = 3  # `neuroal report --fail-on-regression`: the gate tripped

# flag -> (params.yaml key path, parser of the flag's text)
_LIST = lambda text: [v.strip() for v in text.split(",") if v.strip()]  # noqa: E731
_OVERRIDES = {
    "models": ("prune.model", _LIST),
    "methods": ("prune.method", _LIST),
    "top_ups": ("prune.top_up", _LIST),
    "sparsities": ("prune.sparsity", lambda text: [float(v) for v in _LIST(text)]),
    "calib": ("prune.calib", str),
    "nsamples": ("prune.nsamples", int),
    "search_nsamples": ("prune.search_nsamples", int),
    "seqlen": ("prune.seqlen", int),
    "device": ("prune.device", str),
    "ppl": ("eval.ppl", lambda text: [] if text == "none" else _LIST(text)),
    "tasks": ("eval.tasks", lambda text: [] if text == "none" else _LIST(text)),
    "limit": ("eval.limit", int),
    "experiment": ("campaign.experiment", str),
    "out": ("campaign.out", str),
    "executor": ("campaign.executor", str),
    "dvc_remote": ("campaign.dvc_remote", str),
    "artifact_location": ("campaign.artifact_location", str),
    "refresh": ("campaign.refresh", _LIST),
}


def add_campaign_command(commands) -> None:
    """Add the ``campaign`` subcommand to the ``neuroal`` parser's subcommands."""
    p = commands.add_parser("campaign", help="run the Prefect campaign over the params.yaml grid")
    p.add_argument("--params", default="params.yaml", type=Path, help="campaign parameters (default params.yaml)")
    for flag, (key, _) in _OVERRIDES.items():
        p.add_argument(f"--{flag.replace('_', '-')}", dest=flag, metavar="VALUE", help=f"overrides {key}")
    p.add_argument("--no-dvc", action="store_true", help="do not track checkpoints with DVC")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Load params.yaml with the flags' overrides, check every cell, run the campaign flow."""
    from neuroal.config import load_campaign
    from neuroal.errors import UserError

    overrides = {}
    for flag, (key, parse) in _OVERRIDES.items():
        text = getattr(args, flag)
        if text is not None:
            try:
                overrides[key] = parse(text)
            except ValueError:
                raise UserError(f"--{flag.replace('_', '-')} {text!r} is not a valid value for {key}") from None
    if args.no_dvc:
        overrides["campaign.dvc"] = False
    config = load_campaign(args.params, **overrides)
    check_campaign(config)  # bad input fails here, before anything is tracked or written

    _prepare_temporary_server()
    from flows.campaign import CampaignFailed, campaign
    from tasks.tracking import TrackingUnavailable

    try:
        results = campaign(config, root=str(Path.cwd()))
    except (CampaignFailed, TrackingUnavailable) as exc:  # not bad input (exit 2), but one line all the same
        print(f"neuroal: campaign failed: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        if not str(exc).startswith(_NO_TEMPORARY_SERVER):
            raise
        print(f"neuroal: the temporary Prefect server did not start within "
              f"{os.environ['PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS']} s; start one with "
              "`prefect server start` and set PREFECT_API_URL=http://127.0.0.1:4200/api", file=sys.stderr)
        return 1
    if not overrides and config.campaign.dvc and _is_declared_stage(args.params):
        from tasks.versioning import dvc_commit_stage

        dvc_commit_stage(Path.cwd(), STAGE)
    print(results["table"])
    print(f"results: {Path(config.campaign.out) / 'results.json'} ({results['seconds']:.0f} s)")
    return 0


# What Prefect raises when its temporary server does not answer in time.
_NO_TEMPORARY_SERVER = "Timed out while attempting to connect to ephemeral Prefect API server"


def _prepare_temporary_server() -> None:
    """Settings for the temporary Prefect server that a campaign starts when no PREFECT_API_URL is
    set; set before Prefect is imported, which reads them once. A user's own values win."""
    # Offline by design: it must not try to send usage telemetry.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Its start takes about 20 s on two busy cores, Prefect's default limit: 3 of 5 first runs
    # failed. The tests' harness gives it 120 s too.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def check_campaign(config) -> None:
    """Every check of every cell and of the evaluation that loads no weights (``check_config``,
    ``check_eval``); raises ``UserError`` for the first problem."""
    from neuroal.evaluation.evaluate import EvalSpec, check_eval
    from neuroal.models import resolve_model
    from neuroal.pipeline import check_config

    sources = {model: resolve_model(model) for model in config.models()}
    for cell in config.cells():
        check_config(cell, sources[cell.model])
    trust = {key: bool(config.prune.get(key)) for key in ("trust_remote_code", "allow_pickle")}
    evaluation = config.eval
    for model, source in sources.items():
        check_eval(EvalSpec.of_campaign(model, evaluation, **trust), source)


def add_report_command(commands) -> None:
    """Add the ``report`` subcommand to the ``neuroal`` parser's subcommands."""
    from neuroal.history import DEFAULT_HISTORY

    p = commands.add_parser("report", help="render the latest campaign's comparison tables and plots")
    p.add_argument("--params", type=Path, help="where the defaults of --experiment and --out come from "
                   "(default params.yaml when it exists)")
    p.add_argument("--experiment", help="MLflow experiment (default: campaign.experiment of the params)")
    p.add_argument("--out", type=Path, help="report folder (default: <campaign.out of the params>/report)")
    p.add_argument("--history", type=_count, default=DEFAULT_HISTORY, metavar="N",
                   help=f"campaigns in the history section, the latest included (default {DEFAULT_HISTORY}; 0: none)")
    p.add_argument("--fail-on-regression", type=_percent, metavar="PCT",
                   help=f"exit {EXIT_REGRESSION} when, against the previous campaign, a cell failed, a perplexity "
                        "rose by more than PCT percent or a task accuracy fell by more than PCT points")
    p.set_defaults(handler=report)


def report(args: argparse.Namespace) -> int:
    """Write the report of the experiment's latest campaign, print where its HTML page is, and
    gate on regressions when asked."""
    from flows.report import read_report, report_regressions, write_report
    from tasks.tracking import TrackingUnavailable

    settings = _campaign_settings(args.params)
    try:
        found = read_report(args.experiment or settings.experiment, args.history)
        page = write_report(found, args.out or Path(settings.out) / "report")
    except TrackingUnavailable as exc:  # not bad input (exit 2), but one line all the same
        print(f"neuroal: {exc}", file=sys.stderr)
        return 1
    print(f"report: {page}")
    if args.fail_on_regression is not None:
        regressions = report_regressions(found, args.fail_on_regression)
        if regressions:
            print(regression_line(found, regressions), file=sys.stderr)
            return EXIT_REGRESSION
    return 0


def regression_line(report: dict, regressions: list[str]) -> str:
    """The gate's one line: every regressed cell and its numbers."""
    return f"neuroal: {len(regressions)} regression(s) in campaign {report['campaign']['run_id']}: " + "; ".join(regressions)


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a count of campaigns (0 or more)")
    return int(text)


def _percent(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a percentage (0 or more)")
    return value


def add_pull_command(commands) -> None:
    """Add the ``pull`` subcommand to the ``neuroal`` parser's subcommands."""
    p = commands.add_parser("pull", help="restore a campaign cell's checkpoint, by its MLflow run id, from its DVC remote")
    p.add_argument("--run", required=True, help="the cell's MLflow run id (MLFLOW_TRACKING_URI names the store)")
    p.add_argument("--out", required=True, type=Path, help="the folder to restore it to (must not exist)")
    p.add_argument("--remote", help="a path or s3://bucket/prefix (default: the remote the run was pushed to)")
    p.add_argument("--source", help="the source model, if not where the checkpoint records it (alias, hub id, "
                   ".gguf file or folder); its digest must match")
    p.set_defaults(handler=pull)


def pull(args: argparse.Namespace) -> int:
    """Pull and verify the checkpoint of one cell run; print where it is."""
    from tasks.lineage import restore_checkpoint
    from tasks.tracking import TrackingUnavailable

    try:
        folder = restore_checkpoint(args.run, args.out, args.remote, args.source)
    except TrackingUnavailable as exc:
        print(f"neuroal: {exc}", file=sys.stderr)
        return 1
    print(f"checkpoint: {folder} (verified)")
    return 0


def _campaign_settings(params: Path | None):
    """The ``campaign`` settings of ``params`` (or of ./params.yaml when it exists), else the defaults."""
    from neuroal.config import CampaignSettings, load_campaign

    if params is None and not Path("params.yaml").is_file():
        return CampaignSettings()
    return load_campaign(params or Path("params.yaml")).campaign


def _is_declared_stage(params: Path) -> bool:
    """Whether this run is the one ``dvc.yaml`` declares: this folder's params.yaml, no flags."""
    root = Path.cwd()
    if params.resolve() != (root / "params.yaml").resolve() or not (root / "dvc.yaml").is_file():
        return False
    return STAGE in (yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages", {})
