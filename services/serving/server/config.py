"""Server settings: one frozen dataclass read from ``DLSTACK_*`` env vars.

``dlstack serve`` turns its flags into these env vars and execs gunicorn, so the master
(``gunicorn_conf``) and every worker (``create_app``) read the same values.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from services.serving.errors import UserError


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPU limit from cgroup v2 ``cpu.max`` (or v1 quota/period); None when unlimited or unknown."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        if quota != "max":
            return int(quota) / int(period)
        return None
    except (OSError, ValueError):
        pass
    try:
        q = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        p = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return q / p if q > 0 and p > 0 else None
    except (OSError, ValueError):
        return None


def cpu_limit(env: Mapping[str, str] | None = None) -> float:
    """CPUs this container may use: ``DLSTACK_CPU_LIMIT``, else cgroup ``cpu.max``, else ``os.cpu_count()``."""
    env = os.environ if env is None else env
    raw = env.get("DLSTACK_CPU_LIMIT")
    if raw:
        try:
            value = _quantity(raw)
        except ValueError:
            raise UserError(f'DLSTACK_CPU_LIMIT={raw!r} is not a CPU count (e.g. "2", "1.5" or "500m")') from None
        if value <= 0:
            raise UserError(f"DLSTACK_CPU_LIMIT={raw!r} must be > 0")
        return value
    return cgroup_cpu_limit() or float(os.cpu_count() or 1)


def _quantity(raw: str) -> float:
    raw = raw.strip()
    return int(raw[:-1]) / 1000 if raw.endswith("m") else float(raw)


LOG_FORMATS = ("auto", "json", "text")


def log_format(env: Mapping[str, str] | None = None, isatty: bool | None = None) -> str:
    """``DLSTACK_LOG_FORMAT``: "json" or "text"; default "auto" = text when stdout is a terminal, else json.

    JSON is the contract with the log pipeline (Filebeat -> Logstash), so anything that is not a
    person's terminal gets it; master and workers share stdout, so they all choose the same.
    """
    env = os.environ if env is None else env
    raw = env.get("DLSTACK_LOG_FORMAT") or "auto"
    value = raw.strip().lower()
    if value not in LOG_FORMATS:
        raise UserError(f"DLSTACK_LOG_FORMAT={raw!r} is not one of {', '.join(LOG_FORMATS)} (--log-format)")
    if value != "auto":
        return value
    if isatty is None:
        try:
            isatty = sys.stdout.isatty()
        except (AttributeError, ValueError):  # stdout replaced or closed
            isatty = False
    return "text" if isatty else "json"


@dataclass(frozen=True)
class Layout:
    """How the CPU limit is split: processes, their Flask-route threads, and intra-op threads per process."""

    workers: int  # default = CPU limit rounded up; gunicorn worker processes
    http_threads: int  # default 4; threads per worker for the Flask routes (inference runs on the event loop)
    intra_op_threads: int  # default CPU limit / workers, at least 1; framework threads per worker


def layout(cpus: float, workers: int | None = None, http_threads: int | None = None, max_batch_size: int = 1) -> Layout:
    """One worker per CPU keeps the GIL out of the way.

    Each worker answers inference and health on its event loop and runs forward passes in one
    inference thread; ``http_threads`` only serve the Flask routes (metadata, /metrics, OpenAPI),
    so they do not need to grow with the load or the batch size (``max_batch_size`` is kept for
    callers). A batch fills from the requests that arrive while the previous one runs.
    """
    w = workers or max(1, math.ceil(cpus))
    t = http_threads or 4
    return Layout(workers=w, http_threads=t, intra_op_threads=max(1, int(cpus // w)))


@dataclass(frozen=True)
class ServerConfig:
    """What one worker needs to serve one artifact. Unset overrides fall back to model.yaml ``serving``."""

    artifact_dir: Path  # required; the model artifact (model.yaml + files)
    max_batch_size: int | None = None  # default None = model.yaml serving.max_batch_size; rows per forward
    max_batch_time_ms: float | None = None  # default None = model.yaml; ms a batch waits to fill
    max_body_bytes: int | None = None  # default None = model.yaml (16 MiB); request body limit in bytes
    intra_op_threads: int | None = None  # default None = model.yaml serving.threads, else CPU limit / workers
    drain_seconds: float = 0.0  # default 0 s; after SIGTERM keep accepting (ready=503) this long

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ServerConfig:
        env = os.environ if env is None else env
        artifact = env.get("DLSTACK_ARTIFACT_DIR")
        if not artifact:
            raise UserError("DLSTACK_ARTIFACT_DIR is not set; start the server with `dlstack serve ARTIFACT_DIR`")
        return cls(
            artifact_dir=Path(artifact),
            max_batch_size=env_int(env, "DLSTACK_MAX_BATCH_SIZE", 1),
            max_batch_time_ms=_env_float(env, "DLSTACK_MAX_BATCH_TIME_MS", 0),
            max_body_bytes=env_int(env, "DLSTACK_MAX_BODY_BYTES", 1024),
            intra_op_threads=env_int(env, "DLSTACK_INTRA_OP_THREADS", 1),
            drain_seconds=_env_float(env, "DLSTACK_DRAIN_SECONDS", 0) or 0.0,
        )


def env_int(env: Mapping[str, str], key: str, minimum: int) -> int | None:
    value = _env_num(env, key, int, minimum)
    return None if value is None else int(value)


def _env_float(env: Mapping[str, str], key: str, minimum: float) -> float | None:
    return _env_num(env, key, float, minimum)


def _env_num(env: Mapping[str, str], key: str, kind: type[int] | type[float], minimum: float) -> float | None:
    raw = env.get(key)
    if raw is None or raw == "":
        return None
    try:
        value = kind(raw)
    except ValueError:
        raise UserError(f"{key}={raw!r} is not a{'n integer' if kind is int else ' number'}") from None
    if value < minimum:
        raise UserError(f"{key}={raw!r} must be >= {minimum}")
    return value
