"""DVC and git tasks in a temporary git repository: tracking checkpoint folders, pushing them to a
local folder and to a moto S3 server, a clear failure for an unreachable endpoint, git revisions."""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prefect import flow
from servers import (  # noqa: F401 - the fixture_* are the fixtures moto_server, s3_env, prefect_harness
    fixture_moto_server,
    fixture_prefect_harness,
    fixture_s3_env,
    free_port,
    list_keys,
    make_bucket,
)

from tasks import versioning
from tasks.versioning import (
    DvcPushFailed,
    dvc_push,
    dvc_status_clean,
    dvc_track,
    ensure_dvc_repo,
    git_revision,
)


@pytest.fixture(autouse=True)
def no_dvc_analytics(monkeypatch):
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), "-c", "user.name=test", "-c", "user.email=test@example.com",
                           *args], capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def repo(tmp_path, processes) -> Path:
    """A git repository with one commit (git and DVC run as subprocesses on it)."""
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "--quiet")
    (root / "README.md").write_text("campaign\n")
    git(root, "add", "README.md")
    git(root, "commit", "--quiet", "-m", "init")
    return root


def checkpoint(root: Path, name: str = "ck", weights: str = "weights") -> Path:
    folder = root / "runs" / name
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_text(weights)
    (folder / "neuroal.json").write_text('{"sparsity": 0.5}')
    return folder


def cached(root: Path, digest: str) -> Path:
    """Where DVC 3 keeps an object in the local cache (and in a remote, below its URL)."""
    return root / ".dvc" / "cache" / "files" / "md5" / digest[:2] / digest[2:]


def test_ensure_dvc_repo_with_and_without_git(repo, tmp_path):
    ensure_dvc_repo.fn(repo)
    ensure_dvc_repo.fn(repo)  # idempotent
    config = (repo / ".dvc" / "config").read_text()
    assert "no_scm" not in config and "analytics = false" in config

    plain = tmp_path / "plain"
    plain.mkdir()
    ensure_dvc_repo.fn(plain)
    assert "no_scm = True" in (plain / ".dvc" / "config").read_text()


def test_track_returns_dir_hash_and_status_is_clean(repo):
    folder = checkpoint(repo)
    digest = dvc_track.fn(folder, repo)  # initializes DVC on the way
    assert digest.endswith(".dir") and len(digest) == 32 + len(".dir")
    assert (folder.parent / "ck.dvc").is_file() and "/ck" in (folder.parent / ".gitignore").read_text()
    assert cached(repo, digest).is_file()
    assert dvc_status_clean(repo)
    assert dvc_track.fn(folder, repo) == digest  # unchanged folder, same hash

    (folder / "model.safetensors").write_text("other weights")
    assert not dvc_status_clean(repo, [folder])
    assert dvc_track.fn(folder, repo) != digest
    assert dvc_status_clean(repo)


def test_concurrent_tracking_is_serialized(repo):
    folders = [checkpoint(repo, f"ck{i}", f"weights {i}") for i in range(3)]
    with ThreadPoolExecutor(max_workers=3) as pool:
        digests = list(pool.map(lambda f: dvc_track.fn(f, repo), folders))
    assert len(set(digests)) == 3 and all(d.endswith(".dir") for d in digests)
    assert dvc_status_clean(repo)


def test_track_outside_repo_is_refused(repo, tmp_path):
    with pytest.raises(ValueError, match="outside the DVC repository"):
        dvc_track.fn(checkpoint(tmp_path, "elsewhere"), repo)


def test_push_to_local_remote(repo, tmp_path):
    folder = checkpoint(repo)
    digest = dvc_track.fn(folder, repo)
    remote = tmp_path / "remote"
    dvc_push.fn([folder], repo, str(remote))
    assert (remote / "files" / "md5" / digest[:2] / digest[2:]).is_file()
    assert len([p for p in remote.rglob("*") if p.is_file()]) == 3  # the .dir listing and two files
    assert dvc_status_clean(repo, [folder], remote=versioning.DVC_REMOTE)
    # The machine-specific remote lives in the git-ignored config.local, not the committed config.
    assert str(remote) in (repo / ".dvc" / "config.local").read_text()
    assert "neuroal" not in (repo / ".dvc" / "config").read_text()
    assert git(repo, "check-ignore", ".dvc/config.local")


def test_push_to_s3(repo, s3_env):
    make_bucket(s3_env, "dvc")
    folder = checkpoint(repo)
    digest = dvc_track.fn(folder, repo)
    dvc_push.fn([folder], repo, "s3://dvc/checkpoints")
    keys = list_keys(s3_env, "dvc", "checkpoints/")
    assert f"checkpoints/files/md5/{digest[:2]}/{digest[2:]}" in keys and len(keys) == 3
    local = (repo / ".dvc" / "config.local").read_text()
    assert f"endpointurl = {s3_env}" in local
    for config in (local, (repo / ".dvc" / "config").read_text()):
        assert "testing" not in config and "secret" not in config  # credentials stay in the environment


def test_push_retry_policy():
    assert dvc_push.retries == 3 and dvc_push.retry_delay_seconds == [1, 4, 16]


def test_unreachable_s3_fails_clearly_after_retries(repo, s3_env, prefect_harness, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries would only slow the test
    folder = checkpoint(repo)
    digest = dvc_track.fn(folder, repo)
    attempts = []
    configure = versioning.configure_remote
    monkeypatch.setattr(versioning, "configure_remote", lambda *a: attempts.append(1) or configure(*a))

    @flow
    def push():
        # One retry proves the policy applies; each attempt costs DVC's own S3 retries (~5 s).
        dvc_push.with_options(retries=1, retry_delay_seconds=0)([folder], repo, "s3://dvc/unreachable")

    with pytest.raises(DvcPushFailed, match=r"remote 'neuroal' \(s3://dvc/unreachable\).*stay on local disk"
                                            r".*dvc push --remote neuroal"):
        push()
    assert len(attempts) == 2
    assert cached(repo, digest).is_file()


def test_git_revision(repo, tmp_path):
    head = git(repo, "rev-parse", "HEAD")
    assert git_revision(repo) == head
    # A campaign's own outputs are not code: its runs/ folder, the .dvc files and dvc.lock.
    lineage = repo / "runs" / "campaign" / "lineage"
    lineage.mkdir(parents=True)
    for path in (lineage / "cell.dvc", lineage / ".gitignore", repo / "dvc.lock", repo / "elsewhere" / "out.dvc"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("outs: []\n")
    assert git_revision(repo) == head
    (repo / "README.md").write_text("changed\n")
    assert git_revision(repo) == f"{head}-dirty"
    git(repo, "checkout", "--quiet", "README.md")
    (repo / "new_module.py").write_text("x = 1\n")  # untracked code counts too
    assert git_revision(repo) == f"{head}-dirty"
    outside = tmp_path / "not-git"
    outside.mkdir()
    assert git_revision(outside) is None
