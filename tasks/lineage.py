"""From an MLflow cell run back to its exact checkpoint (``neuroal pull --run``), on any machine.

Each cell run holds its checkpoint's ``.dvc`` file and its ``neuroal.json`` as artifacts and the
DVC remote it was pushed to as the ``dvc_remote`` tag, so the run id and the remote's credentials
are all a colleague needs: not the workspace that ran the campaign, nor a commit of its ``.dvc``
files.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from neuroal.checkpoint import MANIFEST, read_manifest
from neuroal.errors import UserError
from tasks.tracking import download_artifact, run_tags
from tasks.versioning import DvcError, pull_checkpoint

DVC_REMOTE_TAG = "dvc_remote"


def restore_checkpoint(run_id: str, out: Path, remote: str | None = None) -> Path:
    """Pull the checkpoint of cell run ``run_id`` into ``out`` and verify it.

    The folder's weight files must match its manifest's sha256 digests, and the manifest must be
    the one logged to the run. ``remote`` overrides the run's ``dvc_remote`` tag.

    Raises:
        UserError: No such run, no checkpoint logged to it, no remote, ``out`` exists, the remote
            lacks the files, or what came back does not verify. Nothing is left at ``out``.
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
            return pull_checkpoint(dvc_file, remote, out, check=lambda folder: _verify(folder, logged, run_id))
        except DvcError as exc:
            raise UserError(str(exc)) from None


def _verify(folder: Path, logged: dict, run_id: str) -> None:
    manifest = read_manifest(folder)  # every weight file against its recorded sha256
    if manifest.files != logged.get("files"):
        raise UserError(f"the pulled checkpoint is not the one run {run_id} logged (its weight digests differ)")
