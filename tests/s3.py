"""A real S3 API server on loopback for the tests: moto's server application in its own process.

``python -m tests.s3 --port N`` runs it. It is moto's own WSGI app (the one ``moto_server`` serves)
with one change: requests are handled one at a time. moto checks ``If-Match``/``If-None-Match`` and
then stores the object in separate steps, so two threads could both pass the check; S3 itself makes
a conditional write atomic, and serializing requests gives the test server that same guarantee (the
registry's compare-and-swap is what is under test, not moto's threading).

``S3Server`` starts and stops one such process on a free port; the ``s3_server`` fixture (one per test
session and xdist worker) hands it out, and each test takes its own bucket from it. ``auth=True``
starts a server that enforces credentials (moto's IAM checks: any made-up key is refused).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The same made-up keys everywhere: moto (without auth) accepts any, and none is a real secret.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "dlstack-test", "AWS_SECRET_ACCESS_KEY": "dlstack-test-secret"}
REGION = "us-east-1"
# AWS variables a developer's shell may hold that would point the tests elsewhere.
_FOREIGN = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_CONFIG_FILE")


class _OneAtATime:
    """WSGI middleware: one request at a time, response body included (see the module docstring)."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        with self.lock:
            body = self.app(environ, start_response)
            try:
                yield from body
            finally:
                close = getattr(body, "close", None)
                if close is not None:
                    close()


def serve(host: str, port: int) -> None:
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import run_simple

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    app = DomainDispatcherApplication(create_backend_app)
    run_simple(host, port, _OneAtATime(app), threaded=True, request_handler=MotoRequestHandler)


class S3Server:
    """A moto S3 server process on 127.0.0.1:``port``; ``stop()`` ends it."""

    def __init__(self, port: int, auth: bool = False, log: Path | None = None) -> None:
        self.port = port
        self.endpoint = f"http://127.0.0.1:{port}"
        self.log = log  # one line per request (werkzeug's access log), for tests that count requests
        env = {**os.environ, "PYTHONPATH": str(ROOT), "MOTO_PORT": str(port)}
        if auth:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"  # moto enforces IAM from the first request
        out = log.open("wb") if log is not None else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.s3", "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(self.endpoint + "/", timeout=2).close()
                break
            except urllib.error.HTTPError:
                break  # it answers (a 403 from an auth-enforcing server is an answer)
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"the test S3 server on port {port} did not start") from None
                time.sleep(0.1)

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS variables that point a client (ours or boto3) at this server."""
        return {**CREDENTIALS, "AWS_REGION": REGION, "AWS_ENDPOINT_URL": self.endpoint}

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        )

    def bucket(self, stem: str = "reg") -> str:
        """A new, empty bucket of its own."""
        name = f"{stem}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def requests(self, method: str, key_suffix: str) -> int:
        """How many ``method`` requests for keys ending in ``key_suffix`` the server has answered so far."""
        if self.log is None or not self.log.exists():
            return 0
        return sum(
            1
            for line in self.log.read_text(errors="replace").splitlines()
            if f'"{method} /' in line and line.split('"')[1].split()[1].split("?")[0].endswith(key_suffix)
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def point_at(server: S3Server, monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    """Point this process's AWS variables at ``server`` (and the blob cache at ``cache``)."""
    for var in _FOREIGN:
        monkeypatch.delenv(var, raising=False)
    for key, value in server.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("DLSTACK_CACHE", str(cache))


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One S3 server for the session (per xdist worker); tests take buckets from it."""
    from tests.conftest import free_port

    server = S3Server(free_port(), log=tmp_path_factory.mktemp("s3") / "server.log")
    try:
        yield server
    finally:
        server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    serve(args.host, args.port)
