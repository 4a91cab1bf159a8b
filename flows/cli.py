"""``neuroal campaign`` and ``neuroal report``: registered into the ``neuroal`` command through the
``neuroal.commands`` entry point, so that the library never imports the orchestration."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import typing
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import yaml

if TYPE_CHECKING:
    from pydantic.fields import FieldInfo

logger = logging.getLogger(__name__)

STAGE = "campaign"  # the dvc.yaml stage that runs `neuroal campaign --params params.yaml`
EXIT_REGRESSION = 3  # `neuroal report --fail-on-regression`: the gate tripped

# The grid axes keep plural flags: a campaign takes a list of each (`--sparsities 0.5,0.7`).
_AXIS_FLAGS = {"model": "models", "method": "methods", "top_up": "top_ups", "sparsity": "sparsities"}
_SECTION_TITLES = {"prune": "the grid (params.yaml prune.*; every cell's neuroal prune settings)",
                   "eval": "evaluation (params.yaml eval.*)", "campaign": "the campaign (params.yaml campaign.*)"}


class _Flag(NamedTuple):
    key: str  # the params.yaml key path it overrides, e.g. prune.sparsity
    field: FieldInfo  # the pydantic field of that key, which parses and validates the flag's text

    @property
    def is_list(self) -> bool:
        return typing.get_origin(self.field.annotation) is list

    @property
    def is_bool(self) -> bool:
        return self.field.annotation is bool

    def parse(self, flag: str, text: str):
        """The flag's text as the field's value (a list comma-separated, ``none`` for the empty list);
        a bad value is a one-line ``UserError`` naming the flag."""
        from pydantic import TypeAdapter, ValidationError

        from neuroal.errors import UserError

        value = text
        if self.is_list:
            value = [] if text.strip().lower() == "none" else [v.strip() for v in text.split(",") if v.strip()]
        annotation = self.field.annotation
        if self.field.metadata:
            annotation = typing.Annotated[(annotation, *self.field.metadata)]
        try:
            return TypeAdapter(annotation).validate_python(value)
        except ValidationError as exc:
            problems = "; ".join(_problem(e) for e in exc.errors())
            raise UserError(f"{flag} {text!r} is not a valid value for {self.key}: {problems}") from None


@functools.cache
def campaign_flags() -> dict[str, _Flag]:
    """``--flag`` -> what it overrides, for every field of ``CampaignConfig`` (the grid, evaluation
    and campaign settings), derived from the models: a new cell setting or allocator option is a flag
    with no edit here. A field is ``--<name>`` (``--seed``, ``--neuroal-mode``; the grid axes plural),
    or ``--<section>-<name>`` where an earlier section took the name (``--eval-seqlen``)."""
    from neuroal.config import CampaignConfig

    flags, taken = {}, {"--params", "--help"}
    for section, model in CampaignConfig.model_fields.items():
        for name, field in model.annotation.model_fields.items():
            flag = "--" + (_AXIS_FLAGS.get(name, name) if section == "prune" else name).replace("_", "-")
            if flag in taken:
                flag = f"--{section}-{name.replace('_', '-')}"
            taken.add(flag)
            flags[flag] = _Flag(f"{section}.{name}", field)
    return flags


def add_campaign_command(commands) -> None:
    """Add the ``campaign`` subcommand to the ``neuroal`` parser's subcommands."""
    p = commands.add_parser("campaign", help="run the Prefect campaign over the params.yaml grid",
                            usage="%(prog)s [-h] [--params PARAMS] [--FLAG VALUE ...]",
                            description="Run the campaign over the grid of --params. Every flag overrides the "
                                        "params.yaml key it names (the grid's flags derive from neuroal prune's "
                                        "settings); lists are comma-separated, `none` empties one.")
    p.add_argument("--params", default="params.yaml", type=Path, help="campaign parameters (default params.yaml)")
    groups = {}
    for flag, spec in campaign_flags().items():
        section = spec.key.partition(".")[0]
        if section not in groups:
            groups[section] = p.add_argument_group(_SECTION_TITLES.get(section, section))
        group = groups[section]
        if spec.is_bool:
            group.add_argument(flag, dest=spec.key, action=argparse.BooleanOptionalAction, default=None,
                               help=f"overrides {spec.key}")
        else:
            group.add_argument(flag, dest=spec.key, default=None, metavar=_metavar(spec), help=_help(spec))
    p.set_defaults(handler=run)


def _help(spec: _Flag) -> str:
    described = f"{spec.field.description}; " if spec.field.description else ""
    choices = _choices(spec.field.annotation)
    listed = "comma-separated, " if spec.is_list else ""
    return f"{described}{listed}overrides {spec.key}" + (f" ({', '.join(choices)})" if choices else "")


def _metavar(spec: _Flag) -> str:
    name = spec.key.partition(".")[2].upper()
    return f"{name}[,...]" if spec.is_list else name


def _choices(annotation) -> tuple:
    """The allowed values of a Literal field, or of a list of a Literal."""
    if typing.get_origin(annotation) is list:
        (annotation,) = typing.get_args(annotation)
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return typing.get_args(annotation) if typing.get_origin(annotation) is typing.Literal else ()


def _problem(error: dict) -> str:
    """One pydantic error, with the item it is about for a list: ``Input should be ... (got '2')``."""
    item = any(isinstance(part, int) for part in error["loc"])
    return error["msg"] + (f" (got {error['input']!r})" if item else "")


def run(args: argparse.Namespace) -> int:
    """Load params.yaml with the flags' overrides, check every cell, run the campaign flow."""
    from neuroal.config import load_campaign

    overrides = {}
    for flag, spec in campaign_flags().items():
        given = getattr(args, spec.key)
        if given is not None:
            overrides[spec.key] = given if spec.is_bool else spec.parse(flag, given)
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
    trust = {key: getattr(config.prune, key) for key in ("trust_remote_code", "allow_pickle")}
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
