"""Processes, request bodies and measurements shared by the server benchmark and its smoke test."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import requests

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Server:
    """A server process group started by ``start``; ``stop()`` always cleans it up."""

    name: str  # label in the report, e.g. "dlstack" or "naive"
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path  # stdout+stderr of the whole process group
    cold_start_s: float = 0.0  # process start -> /v2/health/ready answered 200
    _log: object = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def infer_url(self, model: str) -> str:
        return f"{self.url}/v2/models/{model}/infer"

    def pss_bytes(self) -> int:
        """Proportional set size summed over the master and all its workers (shared pages counted once)."""
        root = psutil.Process(self.proc.pid)
        total = 0
        for p in [root, *root.children(recursive=True)]:
            try:
                total += p.memory_full_info().pss
            except psutil.NoSuchProcess:
                continue
        return total

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        # Workers can outlive a master killed hard; reap the whole group either way.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self._log is not None:
            self._log.close()  # type: ignore[attr-defined]

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start(
    name: str, cmd: list[str], port: int, log_path: Path, env: dict[str, str] | None = None, timeout: float = 120.0
) -> Server:
    """Start ``cmd`` in its own process group and wait until GET /v2/health/ready answers 200."""
    log = log_path.open("wb")
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
        start_new_session=True,
    )
    server = Server(name=name, proc=proc, port=port, log_path=log_path, _log=log)
    ready = f"{server.url}/v2/health/ready"
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode} before ready:\n{server.log_tail()}")
            if time.perf_counter() - t0 > timeout:
                raise RuntimeError(f"{name} not ready after {timeout:.0f} s:\n{server.log_tail()}")
            try:
                if requests.get(ready, timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.02)
    except BaseException:
        server.stop()
        raise
    server.cold_start_s = time.perf_counter() - t0
    return server


def dlstack_cmd(artifact: Path, port: int, workers: int = 2) -> list[str]:
    return [
        sys.executable,
        "-m",
        "stacks.cli",
        "serve",
        str(artifact),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]


UVICORN_WORKER = "uvicorn_worker.UvicornWorker"
ASGI_APP = "services.serving.server.asgi:create_app()"


def uvicorn_available() -> str | None:
    """Why the uvicorn-worker server cannot run here, or None when it can."""
    import importlib.util

    needs = {
        "uvicorn_worker": "uvicorn-worker is not installed (requirements-dev.txt)",
        "services.serving.server.asgi": "services/serving/server/asgi.py does not exist yet",
    }
    for module, why in needs.items():
        if importlib.util.find_spec(module) is None:
            return why
    return None


def uvicorn_cmd(artifact: Path, port: int, workers: int = 2) -> list[str]:
    """dlstack's gunicorn settings and ASGI front end, with uvicorn's worker (httptools + uvloop) instead of ours.

    The command line overrides gunicorn_conf's bind, workers and worker class; DLSTACK_ARTIFACT_DIR must be set
    in the environment (``uvicorn_env``), as ``dlstack serve`` would set it.
    """
    return [sys.executable, "-m", "gunicorn", "-c", "python:services.serving.server.gunicorn_conf",
            "-k", UVICORN_WORKER, "-b", f"127.0.0.1:{port}", "-w", str(workers), ASGI_APP]  # fmt: skip


def uvicorn_env(artifact: Path) -> dict[str, str]:
    return {"DLSTACK_ARTIFACT_DIR": str(artifact.resolve())}


def naive_cmd(port: int, workers: int = 2) -> list[str]:
    gunicorn = str(Path(sys.executable).parent / "gunicorn")
    return [gunicorn, "-w", str(workers), "-b", f"127.0.0.1:{port}", "tests.bench.naive_server:app"]


def json_body(name: str, x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """A V2 JSON infer body, as a client built on ``json`` sends it."""
    body = {"inputs": [{"name": name, "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    return json.dumps(body).encode(), {"Content-Type": "application/json"}


def binary_body(name: str, x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """The body tritonclient sends by default: JSON header + raw tensor bytes, binary outputs requested."""
    import tritonclient.http as httpclient

    inp = httpclient.InferInput(name, list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    body, json_size = httpclient.InferenceServerClient.generate_request_body([inp])
    headers = {"Content-Type": "application/octet-stream"}
    if json_size is not None:
        headers["Inference-Header-Content-Length"] = str(json_size)
    return body, headers


def json_output(resp: requests.Response, name: str) -> np.ndarray:
    """The named output of a V2 JSON response, shaped."""
    resp.raise_for_status()
    for out in resp.json()["outputs"]:
        if out["name"] == name:
            return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
    raise KeyError(f"no output {name!r} in {resp.text[:200]}")
