"""Local servers for the tests: an S3 (moto_server), an MLflow tracking server that keeps its
artifacts in that S3, a Prefect server (a real ``prefect server start``, or Prefect's test harness),
each bound to 127.0.0.1 on a free port and stopped when the test module ends.

Test modules import the fixtures they need (``from servers import fixture_moto_server``; the
fixture is named ``moto_server``); this is a helper module, not a conftest, so only those modules
start servers.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
# Fake credentials: moto accepts any, and real ones must never reach a test server.
FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
_STARTUP_S = 60  # moto imports all its services at start: seconds on a loaded 2-core machine


def free_port() -> int:
    """A TCP port nothing listens on right now (also the way to get a closed port)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = _STARTUP_S) -> None:
    """Block until ``port`` accepts connections; fail early if ``process`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with code {process.returncode} before listening on {port}")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listened on {HOST}:{port} after {timeout} s")


def stop(process: subprocess.Popen, timeout: float = 20) -> None:
    """Terminate ``process``, killing it if it does not exit within ``timeout`` seconds."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_healthy(url: str, timeout: float = 120) -> None:
    """Block until ``url`` answers 200 (a server that listens before it can serve)."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} is not healthy after {timeout} s")


def start_server(cmd: list[str], port: int, log: Path, env: dict | None = None, timeout: float = _STARTUP_S):
    """Start ``cmd`` (a server that will listen on ``port``), its output in ``log``; returns the process."""
    with log.open("w") as out:  # the server keeps its own descriptor
        process = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, process, timeout)
    except BaseException:
        stop(process)
        raise
    return process


def program(name: str) -> str:
    """A console script of this interpreter's environment (``moto_server``, ``prefect``, ``mlflow``)."""
    binary = Path(sys.executable).with_name(name)
    return str(binary) if binary.exists() else shutil.which(name) or pytest.skip(f"{name} is not installed")


@pytest.fixture(scope="module", name="moto_server")
def fixture_moto_server(tmp_path_factory) -> str:
    """An S3 server (``moto_server``) for this module; yields its endpoint URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    process = start_server([program("moto_server"), "-H", HOST, "-p", str(port)], port, log)
    try:
        yield f"http://{HOST}:{port}"
    finally:
        stop(process, timeout=10)


@pytest.fixture(scope="module", name="mlflow_server")
def fixture_mlflow_server(moto_server, tmp_path_factory) -> str:
    """An MLflow tracking server (SQLite) that proxies artifacts to ``s3://mlflow/artifacts`` on the
    moto server, so its clients need no S3 access for tracking; yields its URL."""
    make_bucket(moto_server, "mlflow")
    folder, port = tmp_path_factory.mktemp("mlflow-server"), free_port()
    env = {**os.environ, **FAKE_AWS, "MLFLOW_S3_ENDPOINT_URL": moto_server}
    cmd = [program("mlflow"), "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
           "--artifacts-destination", "s3://mlflow/artifacts", "--host", HOST, "--port", str(port), "--workers", "1"]
    process = start_server(cmd, port, folder / "server.log", env, timeout=120)
    try:
        wait_healthy(f"http://{HOST}:{port}/health")
        yield f"http://{HOST}:{port}"
    finally:
        stop(process)


@pytest.fixture(scope="module", name="prefect_server")
def fixture_prefect_server(tmp_path_factory) -> dict:
    """A ``prefect server start`` for this module; yields the environment of its clients."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": f"http://{HOST}:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false",
           "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_LOGGING_LEVEL": "INFO"}
    process = start_server([program("prefect"), "server", "start", "--host", HOST, "--port", str(port)],
                           port, home / "server.log", env, timeout=180)
    try:
        wait_healthy(f"{env['PREFECT_API_URL']}/health")
        yield env
    finally:
        stop(process)


@pytest.fixture(name="s3_env")
def fixture_s3_env(moto_server, monkeypatch, tmp_path) -> str:
    """Environment of a client of the moto server: fake credentials, its endpoint for boto3, DVC and
    MLflow, and no AWS config files of the user's. Yields the endpoint URL."""
    for name, value in FAKE_AWS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", moto_server)
    return moto_server


def s3_client(endpoint: str):
    """A boto3 S3 client for ``endpoint`` with the fake credentials."""
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name=FAKE_AWS["AWS_DEFAULT_REGION"],
                        aws_access_key_id=FAKE_AWS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=FAKE_AWS["AWS_SECRET_ACCESS_KEY"])


def make_bucket(endpoint: str, bucket: str) -> None:
    """Create ``bucket`` on the server (no error if it exists)."""
    client = s3_client(endpoint)
    if bucket not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
        client.create_bucket(Bucket=bucket)


def list_keys(endpoint: str, bucket: str, prefix: str = "") -> list[str]:
    """Every object key in ``bucket`` under ``prefix``."""
    pages = s3_client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


@pytest.fixture(scope="module", name="prefect_harness")
def fixture_prefect_harness(tmp_path_factory):
    """A temporary Prefect server and database, with a temporary ``PREFECT_HOME``, for this module."""
    from prefect.settings import PREFECT_HOME, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    home = str(tmp_path_factory.mktemp("prefect-home"))
    # The server starts slowly on a loaded machine: allow two minutes.
    with temporary_settings(updates={PREFECT_HOME: home}), prefect_test_harness(server_startup_timeout=120):
        yield


class FlakyProxy:
    """An HTTP proxy in front of ``upstream`` (a Prefect server) that answers 503 on demand:
    ``fail(method, pattern, times, forward)`` makes the next ``times`` requests whose path matches
    ``pattern`` fail, after reaching the server (``forward=True``: the server did the work, the
    client does not know) or before. ``failed`` counts the 503s answered."""

    _HOP = {"host", "content-length", "transfer-encoding", "connection", "content-encoding"}

    def __init__(self, upstream: str):
        import http.server
        import threading

        import httpx

        # No kept-alive upstream connections: uvicorn closes an idle one after 5 s, and a request sent
        # on it as it closes fails ("Server disconnected"), a failure no rule asked for.
        upstream_client = httpx.Client(base_url=upstream, timeout=60, limits=httpx.Limits(max_keepalive_connections=0))
        self.client, self.rules, self.failed, self.lock = upstream_client, [], 0, threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _relay(self):
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                fail = proxy._take(self.command, self.path)
                if fail is None or fail:  # forwarded unless it fails before reaching the server
                    response = proxy.client.request(self.command, self.path, content=body, headers={
                        k: v for k, v in self.headers.items() if k.lower() not in FlakyProxy._HOP})
                if fail is None:
                    status, headers, content = response.status_code, response.headers, response.content
                else:
                    status, headers, content = 503, {}, b'{"detail": "Service Unavailable"}'
                self.send_response(status)
                for name, value in headers.items():
                    if name.lower() not in FlakyProxy._HOP:
                        self.send_header(name, value)
                self.send_header("content-length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _relay

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer((HOST, free_port()), Handler)
        self.server.daemon_threads = True
        self.url = f"http://{HOST}:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def fail(self, method: str, pattern: str, times: int, forward: bool) -> None:
        import re

        with self.lock:
            self.rules.append({"method": method, "path": re.compile(pattern), "left": times, "forward": forward})

    def _take(self, method: str, path: str) -> bool | None:
        """None: relay this request; else fail it (True: after forwarding it)."""
        with self.lock:
            for rule in self.rules:
                if rule["method"] == method and rule["left"] > 0 and rule["path"].search(path.split("?")[0]):
                    rule["left"] -= 1
                    self.failed += 1
                    return rule["forward"]
        return None

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.client.close()
