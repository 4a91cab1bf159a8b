"""DVC and git as thin Prefect tasks: track pruned checkpoint folders, push them to a remote, and
name the code revision that produced them.

DVC commands run as subprocesses (``python -m dvc`` of this interpreter): the command line is DVC's
stable interface, and a subprocess keeps DVC's global state out of Prefect's worker threads; only
config edits use DVC's ``Config`` API in process. Calls on one
repository are serialized with a file lock, since cells may finish in parallel threads or processes
and DVC refuses to run while another DVC process holds the repository.
Credentials come only from the standard AWS environment and config files; nothing here writes them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import yaml
from filelock import FileLock
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.tracking import NETWORK, redact_url

logger = logging.getLogger(__name__)

DVC_REMOTE = "neuroal"
# Where a non-AWS S3 server is (moto, MinIO): the standard AWS variable first, then MLflow's.
ENDPOINT_ENVS = ("AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")
_TAIL_LINES = 5  # of DVC's stderr in an error message: the cause without the whole log


class DvcError(RuntimeError):
    """A DVC command failed."""


class DvcPushFailed(DvcError):
    """Checkpoints could not be pushed to the remote; they are still in the local DVC cache."""


@task(name="dvc-init", cache_policy=NO_CACHE)
def ensure_dvc_repo(root: Path) -> None:
    """Make ``root`` a DVC repository unless it is one (``dvc init``; ``--no-scm`` outside git).

    Args:
        root: The project folder; inside a git work tree but below its top, ``--subdir`` is used.
    """
    root = Path(root).resolve()
    with _lock(root):
        _ensure(root)


# A local operation: one retry covers a transient fault (a lock held by a user's own dvc command).
@task(name="dvc-track", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def dvc_track(path: Path, root: Path) -> str:
    """``dvc add`` a checkpoint folder and return its directory hash.

    The ``.dvc`` file is written beside the folder, and in a git repository DVC lists the folder in
    the ``.gitignore`` beside it. Tracking an unchanged folder again is quick and returns the same hash.

    Args:
        path: The folder (or file) to track, inside ``root``.
        root: The DVC repository (initialized if needed).

    Returns:
        The md5 hash DVC recorded, ending in ``.dir`` for a folder.
    """
    root, path = Path(root).resolve(), Path(path).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"{path} is outside the DVC repository {root}")
    if not path.exists():
        raise FileNotFoundError(f"cannot track {path}: it does not exist")
    with _lock(root):
        _ensure(root)
        _dvc(root, "add", "--quiet", str(path.relative_to(root)))
    digest = dvc_hash(path)
    logger.info("DVC tracks %s as %s", path, digest)
    return digest


@task(name="dvc-push", **NETWORK)
def dvc_push(paths: Iterable[Path], root: Path, remote: str) -> None:
    """Push tracked checkpoints to ``remote`` through a DVC remote named ``neuroal``.

    The remote is configured (or updated) in ``.dvc/config.local``, which git ignores, so neither
    the URL of this machine's remote nor an S3 endpoint (from ``AWS_ENDPOINT_URL`` or
    ``MLFLOW_S3_ENDPOINT_URL``) gets committed.

    Args:
        paths: Tracked folders (or their ``.dvc`` files) inside ``root``.
        root: The DVC repository.
        remote: A local folder or a URL such as ``s3://bucket/prefix``.

    Raises:
        DvcPushFailed: The push failed; the message names the remote. The checkpoints stay on
            local disk and ``dvc push -r neuroal`` can be rerun.
    """
    root = Path(root).resolve()
    # The .dvc files, not the folders: DVC finds those wherever they are, also below a folder
    # that its own ignore check (unlike git's) takes for ignored.
    targets = [str(dvc_file(Path(p).resolve()).relative_to(root)) for p in paths]
    with _lock(root):
        configure_remote(root, remote)
        result = _dvc(root, "push", "--remote", DVC_REMOTE, *targets, check=False)
    if result.returncode != 0:
        raise DvcPushFailed(
            f"dvc push to remote {DVC_REMOTE!r} ({redact_url(remote)}) failed: {_tail(result.stderr)}. "
            f"The checkpoints stay on local disk (DVC cache in {root / '.dvc' / 'cache'}); "
            f"rerun `dvc push --remote {DVC_REMOTE}` in {root} once the remote is reachable."
        )
    logger.info("pushed %d target(s) to %s", len(targets), redact_url(remote))


def configure_remote(root: Path, remote: str) -> None:
    """Point the DVC remote ``neuroal`` at ``remote`` in ``.dvc/config.local``.

    Args:
        root: The DVC repository.
        remote: A local folder (made absolute) or a URL; for ``s3://`` URLs the endpoint comes
            from ``AWS_ENDPOINT_URL`` or ``MLFLOW_S3_ENDPOINT_URL`` when one is set.
    """
    from dvc.config import Config

    section = {"url": (url := _absolute(remote))}
    endpoint = next((os.environ[e] for e in ENDPOINT_ENVS if os.environ.get(e)), None)
    if endpoint and url.startswith("s3://"):
        section["endpointurl"] = endpoint
    # DVC's own config API (validated like `dvc remote add --local --force`, without two subprocesses);
    # the whole section is replaced, so a stale endpointurl from an earlier run goes too.
    with Config(dvc_dir=str(root / ".dvc")).edit("local") as conf:
        conf["remote"][DVC_REMOTE] = section


def remote_url(remote: str) -> str:
    """The remote as recorded for lineage (MLflow's ``dvc_remote`` tag): absolute, without credentials."""
    return redact_url(_absolute(remote))


def _absolute(remote: str) -> str:
    """A URL as given; a local folder made absolute."""
    return remote if "://" in remote else str(Path(remote).expanduser().resolve())


def dvc_commit_stage(root: Path, stage: str) -> None:
    """Record ``stage``'s current dependencies and outputs in ``dvc.lock`` (``dvc commit --force``),
    so that a campaign run by hand, outside ``dvc repro``, leaves ``dvc status`` clean.

    Inside a ``dvc repro`` (``DVC_STAGE`` is set) DVC writes the lock itself and nothing is done.
    """
    if os.environ.get("DVC_STAGE"):
        return
    root = Path(root).resolve()
    with _lock(root):
        _dvc(root, "commit", "--force", "--quiet", stage)


def pull_checkpoint(record: Path, remote: str, out: Path, place: Callable[[Path, Path], None]) -> Path:
    """Fetch the folder that ``record`` (a ``.dvc`` file) names from ``remote``, on any machine:
    through a scratch DVC repository beside ``out``, so neither the workspace that pushed it nor
    its git history is needed. ``place(fetched, out)`` then makes ``out`` from the fetched folder
    (checks it and moves it, or rebuilds a checkpoint from it); the scratch folder is removed.

    Raises:
        DvcError: The remote lacks the files or cannot be reached (the message names it).
    """
    out = Path(out).resolve()
    name = Path(yaml.safe_load(Path(record).read_text())["outs"][0]["path"]).name
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.pull-") as scratch:
        root = Path(scratch)
        _dvc(root, "init", "--quiet", "--no-scm")
        configure_remote(root, remote)
        (root / f"{name}.dvc").write_text(Path(record).read_text())
        result = _dvc(root, "pull", "--remote", DVC_REMOTE, f"{name}.dvc", check=False)
        if result.returncode != 0:
            raise DvcError(f"dvc pull from {redact_url(remote)} failed: {_tail(result.stderr)}")
        place(root / name, out)
    return out


def dvc_hash(path: Path) -> str:
    """The md5 recorded in ``path``'s ``.dvc`` file (``<name>.dvc`` beside it)."""
    return yaml.safe_load(dvc_file(path).read_text())["outs"][0]["md5"]


def dvc_file(path: Path) -> Path:
    """The ``.dvc`` file of a tracked folder or file (``<name>.dvc`` beside it); a ``.dvc`` file itself."""
    path = Path(path)
    return path if path.suffix == ".dvc" else path.with_name(path.name + ".dvc")


def dvc_status_clean(root: Path, targets: Iterable[Path] = (), remote: str | None = None) -> bool:
    """Whether DVC reports nothing to do.

    Args:
        root: The DVC repository.
        targets: Limit the check to these paths (default: the whole repository, pipelines included).
        remote: Compare the cache with this remote name (e.g. ``"neuroal"``) instead of the workspace.

    Returns:
        True when the workspace matches the ``.dvc`` files (or, with ``remote``, everything is pushed).
    """
    root = Path(root).resolve()
    args = ["status", "--json"] + (["--cloud", "--remote", remote] if remote else [])
    with _lock(root):
        out = _dvc(root, *args, *(str(Path(t).resolve().relative_to(root)) for t in targets)).stdout
    return json.loads(out or "{}") == {}


# What a campaign writes into the repository itself: its outputs (runs/), the .dvc files that
# track them and dvc.lock. They are not code, so they do not make the revision dirty; otherwise
# every campaign after the first would record `<sha>-dirty` for unchanged code.
CAMPAIGN_OUTPUTS = (":(exclude)runs", ":(exclude)dvc.lock", ":(exclude,glob)**/*.dvc")


def git_revision(root: Path) -> str | None:
    """The commit checked out in ``root``, with ``-dirty`` when files other than the campaign's own
    outputs (``CAMPAIGN_OUTPUTS``) differ from it.

    Untracked files that git does not ignore count as changes: new code matters to reproducibility.

    Returns:
        ``<sha>`` or ``<sha>-dirty``; None outside a git work tree, without commits or without git.
    """
    try:
        head = _git(root, "rev-parse", "--verify", "HEAD")
        changes = _git(root, "status", "--porcelain", "--", ".", *CAMPAIGN_OUTPUTS)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if changes else "")


def _ensure(root: Path) -> None:
    """``dvc init`` unless ``root/.dvc`` exists; the caller holds the lock."""
    if (root / ".dvc").is_dir():
        return
    try:
        top = Path(_git(root, "rev-parse", "--show-toplevel")).resolve()
    except (OSError, subprocess.CalledProcessError):
        top = None
    mode = ["--no-scm"] if top is None else [] if top == root else ["--subdir"]
    _dvc(root, "init", "--quiet", *mode)
    from dvc.config import Config

    # As the project's own .dvc/config: no usage reports from pipeline runs.
    with Config(dvc_dir=str(root / ".dvc")).edit("repo") as conf:
        conf["core"]["analytics"] = "false"  # as `dvc config` writes it
    logger.info("initialized DVC in %s%s", root, f" ({mode[0]})" if mode else "")


def _dvc(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python -m dvc ARGS`` in ``root``; on failure (if ``check``) raise with DVC's message."""
    cmd = [sys.executable, "-m", "dvc", *args]
    result = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise DvcError(f"`dvc {' '.join(args)}` failed in {root}: {_tail(result.stderr or result.stdout)}")
    return result


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                          check=True).stdout.strip()


def _lock(root: Path) -> FileLock:
    """A lock per repository, outside it (``dvc init`` refuses an existing ``.dvc``)."""
    name = hashlib.sha1(str(root).encode()).hexdigest()[:16]
    return FileLock(Path(tempfile.gettempdir()) / f"neuroal-dvc-{name}.lock")


def _tail(text: str) -> str:
    """The last lines of DVC's message, without its support banner."""
    lines = [line.strip() for line in (text or "").splitlines()
             if line.strip() and not line.startswith("Having any troubles?")]
    return " | ".join(lines[-_TAIL_LINES:]) or "no message"
