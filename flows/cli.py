"""``neuroal campaign``: registered into the ``neuroal`` command through the ``neuroal.commands``
entry point, so that the library never imports the orchestration."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import yaml

logger = logging.getLogger(__name__)

STAGE = "campaign"  # the dvc.yaml stage that runs `neuroal campaign --params params.yaml`

# flag -> (params.yaml key path, parser of the flag's text)
_LIST = lambda text: [v.strip() for v in text.split(",") if v.strip()]  # noqa: E731
_OVERRIDES = {
    "models": ("prune.model", _LIST),
    "methods": ("prune.method", _LIST),
    "top_ups": ("prune.top_up", _LIST),
    "sparsities": ("prune.sparsity", lambda text: [float(v) for v in _LIST(text)]),
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
    """Load params.yaml with the flags' overrides, check the models, run the campaign flow."""
    from neuroal.config import load_campaign
    from neuroal.errors import UserError
    from neuroal.models import resolve_model

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
    for model in config.models():
        resolve_model(model)  # a missing model fails here, before anything is tracked or written

    # Offline by design: a temporary Prefect server must not try to send usage telemetry.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.campaign import CampaignFailed, campaign

    try:
        results = campaign(config, root=str(Path.cwd()))
    except CampaignFailed as exc:
        print(f"neuroal: campaign failed: {exc}", file=sys.stderr)
        return 1
    if not overrides and config.campaign.dvc and _is_declared_stage(args.params):
        from tasks.versioning import dvc_commit_stage

        dvc_commit_stage(Path.cwd(), STAGE)
    print(results["table"])
    print(f"results: {Path(config.campaign.out) / 'results.json'} ({results['seconds']:.0f} s)")
    return 0


def _is_declared_stage(params: Path) -> bool:
    """Whether this run is the one ``dvc.yaml`` declares: this folder's params.yaml, no flags."""
    root = Path.cwd()
    if params.resolve() != (root / "params.yaml").resolve() or not (root / "dvc.yaml").is_file():
        return False
    return STAGE in (yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages", {})
