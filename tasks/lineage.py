"""From an MLflow cell run back to its exact checkpoint (``neuroal pull --run``), on any machine.

Each cell run holds the ``.dvc`` file of its checkpoint's lineage form and its ``neuroal.json``
as artifacts and the DVC remote it was pushed to as the ``dvc_remote`` tag, so the run id, the
remote's credentials and the source model are all a colleague needs: not the workspace that ran
the campaign, nor a commit of its ``.dvc`` files. Runs of campaigns that tracked the full
checkpoint folder instead are pulled and verified as they are.
"""

from __future__ import annotations

import json
import os
import tempfile
from functools import partial
from pathlib import Path

from neuroal.checkpoint import MANIFEST, read_manifest
from neuroal.errors import UserError
from neuroal.lineage import is_lineage, materialize
from tasks.runs import download_artifact, run_tags
from tasks.versioning import DvcError, pull_checkpoint

DVC_REMOTE_TAG = "dvc_remote"


def restore_checkpoint(run_id: str, out: Path, remote: str | None = None, source: str | None = None) -> Path:
    """Pull the checkpoint of cell run ``run_id`` into ``out`` and verify it.

    A lineage form is rebuilt into the full folder from the source model (``source``, else the
    one the checkpoint records, resolved as the campaign resolves it). Every weight file must
    match the manifest's sha256 digests, and the manifest must be the one logged to the run.
    ``remote`` overrides the run's ``dvc_remote`` tag.

    Raises:
        UserError: No such run, no checkpoint logged to it, no remote, ``out`` exists, the remote
            lacks the files, the source is missing or another model, or what came back does not
            verify. Nothing is left at ``out``.
    """
    out = Path(out)
    if out.exists():
        raise UserError(f"{out} already exists; choose another --out")
    tags = run_tags(run_id)
    remote = remote or tags.get(DVC_REMOTE_TAG)
    if not remote:
        raise UserError(f"run {run_id} records no DVC remote (its campaign pushed nowhere); pass --remote")
    name = tags.get("mlflow.runName", "")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            dvc_file = download_artifact(run_id, f"{name}.dvc", Path(tmp))
            logged = json.loads(download_artifact(run_id, MANIFEST, Path(tmp)).read_text())
        except FileNotFoundError:
            raise UserError(f"run {run_id} has no checkpoint to pull (no {name}.dvc or {MANIFEST} artifact)") from None
        try:
            return pull_checkpoint(dvc_file, remote, out, partial(_place, source=source, logged=logged, run_id=run_id))
        except DvcError as exc:
            raise UserError(str(exc)) from None


def _place(fetched: Path, out: Path, source: str | None, logged: dict, run_id: str) -> None:
    """Make ``out`` from what was pulled: rebuild a lineage form, or move a full checkpoint folder,
    once its manifest is the one the run logged and every weight file matches it."""
    lineage = is_lineage(fetched)
    manifest = read_manifest(fetched, verify=not lineage)  # a full folder: every weight file against its sha256
    if manifest.files != logged.get("files"):
        raise UserError(f"the pulled checkpoint is not the one run {run_id} logged (its weight digests differ)")
    if lineage:
        materialize(fetched, out, source)  # every file checked against its sha256 on the way
    else:
        os.replace(fetched, out)
