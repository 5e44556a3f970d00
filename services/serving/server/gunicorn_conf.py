"""Gunicorn settings for the model server, container-aware (``-c python:services.serving.server.gunicorn_conf``).

Workers and threads come from the CPU limit (``DLSTACK_CPU_LIMIT``, else cgroup ``cpu.max``,
else the CPU count); each worker gets CPU limit / workers intra-op threads. The app (and
so the model) is built in each worker after fork: ``preload_app`` stays off; only the
framework module is imported in the master, so its memory is shared (``preload_framework``). Every value
can be overridden with a ``DLSTACK_*`` env var (``dlstack serve`` sets them from its flags).
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from services.serving.errors import UserError
from services.serving.server.config import ServerConfig, cpu_limit, env_int, layout, log_format

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # read by prometheus_client in the workers


def _settings_or_exit() -> ServerConfig:
    """Bad DLSTACK_* values fail here, once and clearly, instead of crash-looping every worker."""
    try:
        for key in ("DLSTACK_WORKERS", "DLSTACK_HTTP_THREADS", "DLSTACK_TIMEOUT", "DLSTACK_GRACEFUL_TIMEOUT"):
            env_int(os.environ, key, 1)
        env_int(os.environ, "DLSTACK_KEEPALIVE", 0)
        env_int(os.environ, "DLSTACK_MAX_REQUESTS", 0)
        env_int(os.environ, "DLSTACK_KEEPALIVE_REQUESTS", 0)
        cpu_limit()
        log_format()
        return ServerConfig.from_env()
    except UserError as exc:
        sys.stderr.write(f"dlstack serve: error: {exc.message}\n")
        raise SystemExit(2) from None


_CONFIG = _settings_or_exit()

# Metrics are only correct across workers in multiprocess mode: without a dir (gunicorn started
# by hand), make one, before anything imports prometheus_client, and remove it at exit.
if not os.environ.get(MULTIPROC_ENV):
    os.environ[MULTIPROC_ENV] = tempfile.mkdtemp(prefix="dlstack-metrics-")
    os.environ["DLSTACK_OWNS_METRICS_DIR"] = "1"


def _int(key: str, default: int) -> int:
    value = env_int(os.environ, key, 0)
    return default if value is None else value


def _spec() -> Any:
    try:
        from services.serving.artifact import read_spec

        return read_spec(os.environ["DLSTACK_ARTIFACT_DIR"])
    except Exception:  # the worker reports a bad artifact; the master just falls back to defaults
        return None


_SPEC = _spec()


def _max_batch_size() -> int:
    if _CONFIG.max_batch_size:
        return _CONFIG.max_batch_size
    return _SPEC.serving.max_batch_size if _SPEC else 1


# Framework modules that are fork-safe to import (no threads started at import). TensorFlow is not.
_PRELOADABLE = {"pytorch", "onnx"}


def preload_framework() -> str | None:
    """Import (never load a model with) the framework in the master, so workers share its pages.

    Importing torch costs ~150 MB of relocated library data and Python objects per process and
    most of the cold start; imported once before fork, it is shared copy-on-write by all workers
    and by the ones gunicorn starts later (max_requests). ``DLSTACK_PRELOAD_FRAMEWORK=0`` turns it off.
    """
    if os.environ.get("DLSTACK_PRELOAD_FRAMEWORK", "1") == "0" or _SPEC is None:
        return None
    importlib.import_module("services.serving.server.app")  # Flask & co: the module only, no app, no model
    framework = _SPEC.framework.value
    if framework not in _PRELOADABLE:
        return None
    importlib.import_module(f"services.serving.runtimes.{framework}")
    return framework


_layout = layout(
    cpu_limit(),
    workers=_int("DLSTACK_WORKERS", 0) or None,
    http_threads=_int("DLSTACK_HTTP_THREADS", 0) or None,
    max_batch_size=_max_batch_size(),
)
# Workers inherit the environment, so this reaches ServerConfig.from_env() in each of them.
os.environ.setdefault("DLSTACK_INTRA_OP_THREADS", str(_layout.intra_op_threads))

bind = [os.environ.get("DLSTACK_BIND", "0.0.0.0:8080")]
workers = _layout.workers
threads = _layout.http_threads
worker_class = "services.serving.server.worker.EventLoopWorker"
preload_app = False  # load the model after fork, in each worker
timeout = _int("DLSTACK_TIMEOUT", 60)  # s a worker may stay silent before the master kills it
graceful_timeout = _int("DLSTACK_GRACEFUL_TIMEOUT", 25)  # s for in-flight requests after SIGTERM (+ drain)
keepalive = _int("DLSTACK_KEEPALIVE", 75)  # s; longer than typical load balancer idle timeouts (60 s)
# Recycle workers to bound slow leaks; 0 = never. A worker answers ~5,000 small requests/s: 100,000 meant a
# restart (and a model load) every 20 s under load.
max_requests = _int("DLSTACK_MAX_REQUESTS", 1_000_000)
max_requests_jitter = max_requests // 10  # spread the recycling so workers never restart together
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None  # heartbeat off overlayfs disk
accesslog = None  # the app writes one ECS access line per request
logger_class = "services.serving.server.logs.GunicornLogger"  # ECS JSON (or text) on stdout; no gunicorn access log
proc_name = "dlstack-model-server"
control_socket_disable = True  # gunicorn's control socket would be shared by every server of a user ($HOME)
forwarded_allow_ips = "*"


def on_starting(server: Any) -> None:
    """Start from an empty multiprocess dir: stale files from a previous run would be summed in."""
    d = os.environ.get(MULTIPROC_ENV)
    if d:
        path = Path(d)
        if path.exists():
            for f in path.glob("*.db"):
                f.unlink(missing_ok=True)
        path.mkdir(parents=True, exist_ok=True)
    server.log.info(
        "layout: %d workers x %d threads, %s intra-op threads each",
        workers,
        threads,
        os.environ["DLSTACK_INTRA_OP_THREADS"],
    )
    preloaded = preload_framework()
    if preloaded:
        server.log.info("imported the %s runtime before fork (the model loads in each worker)", preloaded)


def child_exit(server: Any, worker: Any) -> None:
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def worker_exit(server: Any, worker: Any) -> None:
    """Write the worker's buffered log lines before it exits."""
    from services.serving.server import logs

    logs.flush()


def on_exit(server: Any) -> None:
    """Remove the metrics dir when ``dlstack serve`` created it (DLSTACK_OWNS_METRICS_DIR=1)."""
    d = os.environ.get(MULTIPROC_ENV)
    if d and os.environ.get("DLSTACK_OWNS_METRICS_DIR") == "1":
        shutil.rmtree(d, ignore_errors=True)
