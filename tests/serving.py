"""Run the REAL model server (``dlstack serve`` -> gunicorn) for tests, and clean it up.

    with start_server(artifact_dir, workers=2) as srv:
        requests.post(f"{srv.url}/v2/models/mlp/infer", json=...)

``start_server`` returns once every worker has finished loading its model (each logs one
``dlstack.server`` line with ``event.outcome``) and, by default, ``/v2/health/ready`` is 200.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil
import requests

from tests.conftest import ROOT, free_port


class ServerHandle:
    def __init__(self, proc: subprocess.Popen[str], port: int) -> None:
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self._lines: list[str] = []
        self._err: list[str] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, args=(proc.stdout, self._lines), daemon=True)
        self._reader.start()
        self._err_reader = threading.Thread(target=self._read, args=(proc.stderr, self._err), daemon=True)
        self._err_reader.start()

    def _read(self, stream: Any, sink: list[str]) -> None:
        for line in stream:
            with self._lock:
                sink.append(line.rstrip("\n"))

    def stderr_lines(self) -> list[str]:
        with self._lock:
            return list(self._err)

    def stdout_lines(self) -> list[str]:
        """Every stdout line so far (all JSON when the server behaves)."""
        with self._lock:
            return list(self._lines)

    def json_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stdout_lines()]

    def access_lines(self, at_least: int = 0, timeout: float = 10) -> list[dict[str, Any]]:
        """Access log lines; waits (up to ``timeout``) for ``at_least`` of them, as our pipe reader may lag."""
        deadline = time.monotonic() + timeout
        while True:
            lines = [d for d in self.json_lines() if d.get("event", {}).get("dataset") == "dlstack.access"]
            if len(lines) >= at_least or time.monotonic() > deadline:
                return lines
            time.sleep(0.05)

    def load_events(self) -> list[dict[str, Any]]:
        """One line per worker model load (success or failure)."""
        out = []
        for line in self.stdout_lines():
            with contextlib.suppress(ValueError):
                d = json.loads(line)
                if d.get("event", {}).get("dataset") == "dlstack.server" and "outcome" in d.get("event", {}):
                    out.append(d)
        return out

    def worker_pids(self) -> set[int]:
        try:
            return {c.pid for c in psutil.Process(self.proc.pid).children() if c.status() != psutil.STATUS_ZOMBIE}
        except psutil.NoSuchProcess:
            return set()

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM (graceful), then SIGKILL if it does not exit in ``timeout`` s; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._reader.join(5)
        self._err_reader.join(5)
        return int(self.proc.returncode)

    def kill(self) -> None:
        with contextlib.suppress(psutil.NoSuchProcess):
            parent = psutil.Process(self.proc.pid)
            for child in parent.children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait(10)


@contextlib.contextmanager
def start_server(
    artifact_dir: Path | str,
    *,
    workers: int = 2,
    threads: int | None = None,
    port: int | None = None,
    env: Mapping[str, str] | None = None,
    extra_args: Sequence[str] = (),
    wait_ready: bool = True,
    timeout: float = 60,
    direct: bool = False,
    gunicorn_args: Sequence[str] = (),
) -> Iterator[ServerHandle]:
    """A real ``dlstack serve`` (gunicorn) on a free port; stopped (and killed if need be) on exit.

    ``direct=True`` skips the CLI and runs gunicorn with the config module, as a container
    entry point may, so the worker-side checks (e.g. a corrupted file) can be tested;
    ``gunicorn_args`` then replace the app (e.g. ``-k uvicorn_worker.UvicornWorker 'asgi:create_app()'``).
    """
    port = port or free_port()
    full_env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    # Tests stop servers often: no drain period unless a test asks for one; 1 CPU per worker.
    full_env.update({"DLSTACK_DRAIN_SECONDS": "0", "PYTHONUNBUFFERED": "1", "DLSTACK_CPU_LIMIT": str(workers)})
    metrics_dir = None
    if direct:
        from services.serving.server.cli import APP, CONF

        metrics_dir = tempfile.mkdtemp(prefix="dlstack-test-metrics-")
        args = [sys.executable, "-m", "gunicorn", "-c", CONF, *(gunicorn_args or [APP])]
        full_env.update(
            {
                "DLSTACK_ARTIFACT_DIR": str(Path(artifact_dir).resolve()),
                "DLSTACK_BIND": f"127.0.0.1:{port}",
                "DLSTACK_WORKERS": str(workers),
                "PROMETHEUS_MULTIPROC_DIR": metrics_dir,
            }
        )
        if threads:
            full_env["DLSTACK_HTTP_THREADS"] = str(threads)
    else:
        args = [
            sys.executable, "-m", "stacks.cli", "serve", str(artifact_dir),
            "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
        ]  # fmt: skip
        if threads:
            args += ["--threads", str(threads)]
        args += list(extra_args)
    full_env.update(env or {})
    proc = subprocess.Popen(
        args, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1
    )
    handle = ServerHandle(proc, port)
    try:
        _wait(handle, workers, wait_ready, timeout)
        yield handle
    finally:
        if handle.proc.poll() is None:
            handle.stop()
        else:
            handle._reader.join(5)
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _wait(handle: ServerHandle, workers: int, wait_ready: bool, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if handle.proc.poll() is not None:
            handle._reader.join(5)
            raise RuntimeError(
                f"server exited with {handle.proc.returncode} before ready:\n"
                + "\n".join(handle.stdout_lines()[-30:] + handle.stderr_lines()[-30:])
            )
        if len(handle.load_events()) >= workers:
            try:
                r = requests.get(f"{handle.url}/v2/health/ready", timeout=2)
                if r.status_code == 200 or not wait_ready:
                    return
            except requests.ConnectionError:
                pass
        time.sleep(0.05)
    raise TimeoutError(
        f"server not ready after {timeout}s:\n" + "\n".join(handle.stdout_lines()[-30:] + handle.stderr_lines()[-30:])
    )


def make_onnx_types_artifact(out: Path, name: str = "types", **serving: Any) -> Path:
    """A real ONNX model over the awkward datatypes: BYTES identity, BOOL not, FP16 doubling, INT64 +1.

    Inputs: text BYTES [-1, 2], flag BOOL [-1, 3], half FP16 [-1, 4], count INT64 [-1, 1];
    outputs text_out, flag_out, half_out, count_out with the same dtypes and shapes.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from services.serving.artifact import FileEntry, ModelSpec, Serving, Signature, TensorSpec, file_sha256, write_spec

    tensors = [("text", TensorProto.STRING, 2, "BYTES"), ("flag", TensorProto.BOOL, 3, "BOOL"),
               ("half", TensorProto.FLOAT16, 4, "FP16"), ("count", TensorProto.INT64, 1, "INT64")]  # fmt: skip
    graph = helper.make_graph(
        [
            helper.make_node("Identity", ["text"], ["text_out"]),
            helper.make_node("Not", ["flag"], ["flag_out"]),
            helper.make_node("Mul", ["half", "two"], ["half_out"]),
            helper.make_node("Add", ["count", "one"], ["count_out"]),
        ],
        "types",
        [helper.make_tensor_value_info(n, t, ["batch", d]) for n, t, d, _ in tensors],
        [helper.make_tensor_value_info(f"{n}_out", t, ["batch", d]) for n, t, d, _ in tensors],
        initializer=[
            numpy_helper.from_array(np.array(2, dtype=np.float16), "two"),
            numpy_helper.from_array(np.array(1, dtype=np.int64), "one"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    out.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out / "model.onnx"))
    spec = ModelSpec(
        name=name,
        framework="onnx",  # type: ignore[arg-type]
        files=(FileEntry(path="model.onnx", sha256=file_sha256(out / "model.onnx")),),
        signature=Signature(
            inputs=tuple(TensorSpec(name=n, datatype=v2, shape=(-1, d)) for n, _, d, v2 in tensors),  # type: ignore[arg-type]
            outputs=tuple(TensorSpec(name=f"{n}_out", datatype=v2, shape=(-1, d)) for n, _, d, v2 in tensors),  # type: ignore[arg-type]
        ),
        serving=Serving(**serving),
    )
    write_spec(out, spec)
    return out
