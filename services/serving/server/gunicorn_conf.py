"""Gunicorn settings for the model server, container-aware (``-c python:services.serving.server.gunicorn_conf``).

Workers and threads come from the CPU limit (``DLSTACK_CPU_LIMIT``, else cgroup ``cpu.max``,
else the CPU count); each worker gets CPU limit / workers intra-op threads unless model.yaml
``serving.threads`` or ``DLSTACK_INTRA_OP_THREADS`` says otherwise. The app (and so the model) is
built in each worker after fork: ``preload_app`` stays off; only the framework module is imported
in the master, so its memory is shared (``preload_framework``). Every value comes from
``ServerSettings`` (``DLSTACK_*`` env vars; ``dlstack serve`` sets them from its flags), validated
here once; the master logs them, resolved, as one ``effective settings`` line at start.
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
from services.serving.server.settings import ServerSettings, layout

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # read by prometheus_client in the workers


def _settings_or_exit() -> ServerSettings:
    """Bad DLSTACK_* values fail here, once and clearly, instead of crash-looping every worker."""
    try:
        return ServerSettings.from_env()
    except UserError as exc:
        sys.stderr.write(f"dlstack serve: error: {exc.message}\n")
        raise SystemExit(2) from None


_SETTINGS = _settings_or_exit()

# Metrics are only correct across workers in multiprocess mode: without a dir (gunicorn started
# by hand), make one, before anything imports prometheus_client, and remove it at exit.
if not os.environ.get(MULTIPROC_ENV):
    os.environ[MULTIPROC_ENV] = tempfile.mkdtemp(prefix="dlstack-metrics-")
    os.environ["DLSTACK_OWNS_METRICS_DIR"] = "1"


def _spec() -> Any:
    try:
        from services.serving.artifact import read_spec

        return read_spec(_SETTINGS.artifact_dir)
    except Exception:  # the worker reports a bad artifact; the master just falls back to defaults
        return None


_SPEC = _spec()


# Framework modules that are fork-safe to import (no threads started at import). TensorFlow is not.
_PRELOADABLE = {"pytorch", "onnx"}


def preload_framework() -> str | None:
    """Import (never load a model with) the framework in the master, so workers share its pages.

    Importing torch costs ~150 MB of relocated library data and Python objects per process and
    most of the cold start; imported once before fork, it is shared copy-on-write by all workers
    and by the ones gunicorn starts later (max_requests). ``DLSTACK_PRELOAD_FRAMEWORK=0`` turns it off.
    """
    if not _SETTINGS.preload_framework or _SPEC is None:
        return None
    importlib.import_module("services.serving.server.app")  # Flask & co: the module only, no app, no model
    framework = _SPEC.framework.value
    if framework not in _PRELOADABLE:
        return None
    importlib.import_module(f"services.serving.runtimes.{framework}")
    return framework


_EFFECTIVE = _SETTINGS.effective(_SPEC)
_layout = layout(
    _SETTINGS.cpus(),
    workers=_SETTINGS.workers,
    http_threads=_SETTINGS.http_threads,
    max_batch_size=_EFFECTIVE.max_batch_size,
)
_INTRA_OP_THREADS = _EFFECTIVE.intra_op_threads or _layout.intra_op_threads
if _EFFECTIVE.intra_op_threads is None:
    # Workers inherit the environment, so the split of the CPU limit reaches their ServerSettings.
    os.environ[ServerSettings.env_name("intra_op_threads")] = str(_layout.intra_op_threads)

bind = [_SETTINGS.bind]
workers = _layout.workers
threads = _layout.http_threads
worker_class = "services.serving.server.worker.EventLoopWorker"
preload_app = False  # load the model after fork, in each worker
timeout = _SETTINGS.timeout
graceful_timeout = _SETTINGS.graceful_timeout
keepalive = _SETTINGS.keepalive
max_requests = _SETTINGS.max_requests
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
    server.log.info("layout: %d workers x %d threads, %s intra-op threads each", workers, threads, _INTRA_OP_THREADS)
    for warning in ServerSettings.misspelled(os.environ):
        server.log.warning(warning)
    values = effective_settings()
    server.log.info(
        "effective settings: %s", " ".join(f"{k}={v}" for k, v in values.items()), extra={"dlstack.settings": values}
    )
    preloaded = preload_framework()
    if preloaded:
        server.log.info("imported the %s runtime before fork (the model loads in each worker)", preloaded)


def effective_settings() -> dict[str, Any]:
    """Every ServerSettings field as this server runs it: env/flags, then model.yaml, then the CPU layout."""
    values: dict[str, Any] = _SETTINGS.model_dump(mode="json")
    values.update(
        workers=workers,
        http_threads=threads,
        cpu_limit=_SETTINGS.cpus(),
        intra_op_threads=_INTRA_OP_THREADS,
        log_format=_SETTINGS.resolved_log_format(),
        max_batch_size=_EFFECTIVE.max_batch_size,
        max_batch_time_ms=_EFFECTIVE.max_batch_time_ms,
        max_body_bytes=_EFFECTIVE.max_body_bytes,
    )
    return values


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
