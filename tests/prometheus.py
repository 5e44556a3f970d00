"""A real Prometheus for the end-to-end tests: its config written, started on a free loopback port, stopped.

One place for what every end-to-end test needs from it (SLO rules, the promotion gate, KEDA's trigger
query, drift scores), so a fix to how it starts or stops reaches all of them.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import requests
from ruamel.yaml import YAML

from tests.conftest import free_port

PROMETHEUS = shutil.which("prometheus")


def wait_for(ok: Callable[[], Any], timeout: float, what: str, interval: float = 0.25) -> Any:
    """``ok()``'s first truthy value; errors while a server starts count as "not yet"."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            got = ok()
            if got:
                return got
        except (requests.RequestException, AssertionError, ValueError, KeyError) as exc:
            last = exc
        time.sleep(interval)
    raise TimeoutError(f"{what}: not reached in {timeout} s ({last})")


def query(url: str, expr: str) -> list[dict[str, Any]]:
    """The result series of an instant query; a query Prometheus rejects fails with its error."""
    body = requests.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert body.get("status") == "success", f"Prometheus rejected {expr!r}: {body.get('error')}"
    return list(body["data"]["result"])


@contextlib.contextmanager
def running_prometheus(tmp: Path, config: dict[str, Any]) -> Iterator[str]:
    """Prometheus with ``config`` (rule files relative to ``tmp``), ready; yields its URL."""
    assert PROMETHEUS, "the prometheus binary is missing (make sysdeps-test installs it)"
    with (tmp / "prometheus.yml").open("w") as fh:
        YAML(typ="safe", pure=True).dump(config, fh)
    # promtool (same Debian package) says what is wrong with a config; Prometheus would only exit.
    check = subprocess.run(
        ["promtool", "check", "config", str(tmp / "prometheus.yml")], capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr
    port = free_port()
    log = tmp / "prometheus.log"
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=1h",
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            assert proc.poll() is None, f"prometheus exited: {log.read_text()[-2000:]}"
            return requests.get(f"{url}/-/ready", timeout=1).status_code == 200

        wait_for(ready, 30, "Prometheus ready")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
