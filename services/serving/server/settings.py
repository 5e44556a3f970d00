"""Server settings: one typed ``ServerSettings`` read from ``DLSTACK_*`` env vars, with one default per field.

``dlstack serve`` turns its flags into these env vars and execs gunicorn, so the master
(``gunicorn_conf``) and every worker (``create_app``) read the same values. The master validates
them once: a bad value is one line naming the variable and the fix, not a crash loop of workers.
Infra (``infra/model_service.py``) writes a pod's env through ``env_name``/``to_env`` so the names
exist only here. ``max_batch_size``, ``max_batch_time_ms``, ``max_body_bytes`` and
``intra_op_threads`` default to None = the artifact's model.yaml ``serving`` (see ``Effective``).
"""

from __future__ import annotations

import difflib
import math
import os
import sys
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from annotated_types import Ge, Gt, Le
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings.sources.utils import parse_env_vars

from services.serving.errors import UserError

if TYPE_CHECKING:
    from services.serving.artifact import ModelSpec

ENV_PREFIX = "DLSTACK_"
LOG_FORMATS = ("auto", "json", "text")
_ENV: ContextVar[Mapping[str, str] | None] = ContextVar("dlstack_settings_env", default=None)


class ServerSettings(BaseSettings):
    """Every knob of the model server; env var = ``DLSTACK_`` + the field name in upper case."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        case_sensitive=False,  # field names are lower case, env names upper case; both spellings work
        env_ignore_empty=True,  # FOO= (empty) means unset, as a shell user expects
        extra="ignore",
        frozen=True,
        allow_inf_nan=False,  # "nan" or "inf" is never a timeout, a sample rate or a CPU count
    )

    # the model and the process layout
    artifact_dir: Path  # required; the model artifact (model.yaml + files)
    bind: str = "0.0.0.0:8080"  # default 0.0.0.0:8080; gunicorn bind address host:port
    workers: int | None = Field(default=None, ge=1)  # default None = CPU limit rounded up; worker processes
    http_threads: int = Field(default=4, ge=1)  # default 4; threads per worker for blocking routes
    cpu_limit: float | None = Field(default=None, gt=0)  # default None = cgroup cpu.max, else CPU count; CPUs
    intra_op_threads: int | None = Field(default=None, ge=1)  # default None = model.yaml threads, else CPUs/workers
    timeout: int = Field(default=60, ge=1)  # default 60 s a worker may stay silent before the master kills it
    graceful_timeout: int = Field(default=25, ge=1)  # default 25 s for in-flight requests after SIGTERM (+ drain)
    keepalive: int = Field(default=75, ge=0)  # default 75 s; longer than load balancers' idle timeouts (60 s)
    # default 1,000,000 requests before a worker is recycled (0 = never); bounds slow leaks. 100,000 meant a
    # restart (and a model load) every 20 s under load.
    max_requests: int = Field(default=1_000_000, ge=0)
    keepalive_requests: int = Field(default=1000, ge=0)  # default 1000 requests per connection (0 = no limit)
    drain_seconds: float = Field(default=0.0, ge=0)  # default 0 s; after SIGTERM keep accepting (ready=503)
    log_format: Literal["auto", "json", "text"] = "auto"  # default auto = text on a terminal, else json (ECS)
    preload_framework: bool = True  # default True; import torch/onnxruntime in the master, shared by workers

    # batching and request size; None = model.yaml ``serving`` (artifact.Serving owns those defaults)
    max_batch_size: int | None = Field(default=None, ge=1)  # default None = model.yaml; rows per forward pass
    max_batch_time_ms: float | None = Field(default=None, ge=0)  # default None = model.yaml; ms to fill a batch
    max_body_bytes: int | None = Field(default=None, ge=1024)  # default None = model.yaml (16 MiB); bytes

    # HTTP hardening (http1.py)
    max_header_count: int = Field(default=100, ge=1)  # default 100 header lines per request (repeats count each)
    max_header_line_bytes: int = Field(default=8190, ge=256)  # default 8190 bytes; request line and each header
    header_timeout_s: float = Field(default=10.0, gt=0)  # default 10 s from a request's first byte to its headers' end
    body_timeout_s: float = Field(default=30.0, gt=0)  # default 30 s; longest gap between two body reads
    idle_timeout_s: float | None = Field(default=None, ge=0)  # default None = keepalive; s a kept-alive conn may idle
    max_connections: int = Field(default=1000, ge=1)  # default 1000 per worker; over it the oldest idle one closes
    write_buffer_bytes: int = Field(default=1 << 20, ge=1024)  # default 1 MiB unsent output, then stop reading

    # production feedback (prediction log, drift)
    prediction_log_sample: float = Field(default=0.0, ge=0, le=1)  # default 0.0 = off; fraction of requests logged
    prediction_log_max_bytes: int = Field(default=4096, ge=256)  # default 4096 bytes of inputs/outputs per event
    prediction_log_queue: int = Field(default=1000, ge=1)  # default 1000 events queued before dropping
    drift_sample: float = Field(default=0.0, ge=0, le=1)  # default 0.0 = off; fraction of requests binned for drift
    # Rows binned past the cap buy no precision: PSI's sampling noise is ~9 / rows per group, ~0.0001 over a 1h
    # window at 20 rows/s against a 0.2 threshold. On a fast model they cost throughput (make bench, README).
    drift_max_rows_per_s: float = Field(default=20.0, ge=0)  # default 20 rows/s per server, over its workers; 0 = none

    @field_validator("cpu_limit", mode="before")
    @classmethod
    def _cpu_quantity(cls, v: Any) -> Any:
        # The Kubernetes form ("500m") is what a Deployment's limit says; accept it as written there.
        if isinstance(v, str) and v.strip().endswith("m"):
            try:
                return int(v.strip()[:-1]) / 1000
            except ValueError:
                raise ValueError('is not a CPU count; set it to e.g. "2", "1.5" or "500m"') from None
        return v

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.strip().lower() if isinstance(v, str) else v

    @model_validator(mode="after")
    def _idle_default(self) -> ServerSettings:
        if self.idle_timeout_s is None:  # frozen: set once here, so readers always get a number
            object.__setattr__(self, "idle_timeout_s", float(self.keepalive))
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Only arguments and the process env (or the mapping given to from_env): no .env or secrets files.
        return init_settings, _MappingEnv(settings_cls, _ENV.get())

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> ServerSettings:
        """Settings from ``env`` (default ``os.environ``); a bad value raises one-line ``UserError``."""
        token = _ENV.set(env)
        try:
            return cls(**overrides)
        except ValidationError as exc:
            raise UserError(describe(exc, env if env is not None else os.environ)) from None
        finally:
            _ENV.reset(token)

    @staticmethod
    def env_name(field: str) -> str:
        """``max_batch_size`` -> ``DLSTACK_MAX_BATCH_SIZE``; a typo is a KeyError, not a silent new variable."""
        if field not in ServerSettings.model_fields:
            raise KeyError(f"ServerSettings has no field {field!r}")
        return ENV_PREFIX + field.upper()

    @staticmethod
    def misspelled(env: Mapping[str, str]) -> list[str]:
        """A warning per ``DLSTACK_*`` name that is no setting but close to one (a typo is otherwise ignored).

        Only near misses: the tooling's own variables (DLSTACK_REGISTRY, DLSTACK_CACHE ...) share the prefix.
        """
        known = [ServerSettings.env_name(f) for f in ServerSettings.model_fields]
        out = []
        for key in sorted(env):
            if key.upper().startswith(ENV_PREFIX) and key.upper() not in known:
                close = difflib.get_close_matches(key.upper(), known, n=1, cutoff=0.85)
                if close:
                    out.append(f"{key} is not a server setting and is ignored; did you mean {close[0]}?")
        return out

    @staticmethod
    def to_env(**values: Any) -> dict[str, str]:
        """``{env name: text}`` for the given fields, validated as the server will read them; None is left out."""
        env = {ServerSettings.env_name(k): _text(v) for k, v in values.items() if v is not None}
        ServerSettings.from_env({ServerSettings.env_name("artifact_dir"): "/model", **env})
        return env

    def effective(self, spec: ModelSpec | None) -> Effective:
        """What this server does with this model: env/flags first, then model.yaml ``serving``."""
        serving = spec.serving if spec else None
        return Effective(
            max_batch_size=self.max_batch_size or (spec.max_batch_size if spec else 1),
            max_batch_time_ms=(
                self.max_batch_time_ms
                if self.max_batch_time_ms is not None
                else (serving.max_batch_time_ms if serving else 0.0)
            ),
            max_body_bytes=self.max_body_bytes or (serving.max_body_bytes if serving else 16 << 20),
            intra_op_threads=self.intra_op_threads or (serving.threads if serving else None),
        )

    def cpus(self) -> float:
        """CPUs this container may use: ``DLSTACK_CPU_LIMIT``, else cgroup ``cpu.max``, else ``os.cpu_count()``."""
        return self.cpu_limit or cgroup_cpu_limit() or float(os.cpu_count() or 1)

    def resolved_log_format(self, isatty: bool | None = None) -> str:
        """ "json" or "text". JSON is the contract with the log pipeline, so only a person's terminal gets text;
        master and workers share stdout, so they all choose the same."""
        if self.log_format != "auto":
            return self.log_format
        if isatty is None:
            try:
                isatty = sys.stdout.isatty()
            except (AttributeError, ValueError):  # stdout replaced or closed
                isatty = False
        return "text" if isatty else "json"


@dataclass(frozen=True)
class Effective:
    """The serving values after env/flags and model.yaml are combined (reported in model metadata)."""

    max_batch_size: int  # rows per forward pass; 1 = batching off
    max_batch_time_ms: float  # ms the first request of a batch waits for more
    max_body_bytes: int  # request body limit
    intra_op_threads: int | None  # None = the runtime's default (CPU limit / workers, set by gunicorn_conf)


class _MappingEnv(EnvSettingsSource):
    """The env source, reading a given mapping instead of ``os.environ`` when one is given."""

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str] | None) -> None:
        self._mapping = env
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        env = os.environ if self._mapping is None else self._mapping
        return parse_env_vars(env, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str)


def _text(v: Any) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


_KIND = {
    "int_parsing": "is not an integer",
    "int_from_float": "is not an integer",
    "float_parsing": "is not a number",
    "bool_parsing": "is not a boolean",
    "finite_number": "is not a finite number",
}


def describe(exc: ValidationError, env: Mapping[str, str]) -> str:
    """One line per ValidationError: ``DLSTACK_WORKERS='x' is not an integer; set it to a whole number >= 1``."""
    parts = []
    for e in exc.errors():
        field = str(e["loc"][0]) if e["loc"] else ""
        if field not in ServerSettings.model_fields:
            parts.append(e["msg"])
            continue
        key = ServerSettings.env_name(field)
        if e["type"] == "missing":
            parts.append(f"{key} is not set; start the server with `dlstack serve ARTIFACT_DIR`")
            continue
        raw = _raw(env, key, e.get("input"))
        if e["type"] == "value_error":
            parts.append(f"{key}={raw!r} {e['msg'].removeprefix('Value error, ')}")
            continue
        if e["type"] == "literal_error":  # the choices are the fix; dlstack serve's flag has the same name
            parts.append(f"{key}={raw!r} {_expected(field).replace('one of', 'is not one of')} (--log-format)")
            continue
        what = _KIND.get(e["type"], "is out of range")
        parts.append(f"{key}={raw!r} {what}; set it to {_expected(field)}")
    return "; ".join(parts)


def _raw(env: Mapping[str, str], key: str, fallback: Any) -> str:
    for k, v in env.items():  # as the user wrote it ("500m", " 2"), not as parsed
        if k.upper() == key:
            return v
    return str(fallback)


def _expected(field: str) -> str:
    """What a valid value looks like, from the field's type and bounds (one source of truth)."""
    info = ServerSettings.model_fields[field]
    lo: Any = None
    hi: Any = None
    strict = False
    for m in info.metadata:
        if isinstance(m, Ge):
            lo = m.ge
        elif isinstance(m, Gt):
            lo, strict = m.gt, True
        elif isinstance(m, Le):
            hi = m.le
    ann = str(info.annotation)
    if field == "cpu_limit":
        return 'a CPU count > 0, e.g. "2", "1.5" or "500m"'
    if field == "log_format":
        return "one of " + ", ".join(LOG_FORMATS)
    if "bool" in ann:
        return "1 or 0 (true/false)"
    kind = "a whole number" if "int" in ann else "a number"
    if lo is not None and hi is not None:
        return f"{kind} between {lo:g} and {hi:g}"
    if lo is not None:
        return f"{kind} {'>' if strict else '>='} {lo:g}"
    return kind


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


@dataclass(frozen=True)
class Layout:
    """How the CPU limit is split: processes, their blocking-route threads, and intra-op threads per process."""

    workers: int  # default = CPU limit rounded up; gunicorn worker processes
    http_threads: int  # default 4; threads per worker for blocking routes (inference runs on the event loop)
    intra_op_threads: int  # default CPU limit / workers, at least 1; framework threads per worker


def layout(cpus: float, workers: int | None = None, http_threads: int | None = None, max_batch_size: int = 1) -> Layout:
    """One worker per CPU keeps the GIL out of the way.

    Each worker answers inference and health on its event loop and runs forward passes in one
    inference thread; ``http_threads`` only serve routes that may block (/metrics, requests during the load),
    so they do not need to grow with the load or the batch size (``max_batch_size`` is kept for
    callers). A batch fills from the requests that arrive while the previous one runs.
    """
    w = workers or max(1, math.ceil(cpus))
    t = http_threads or ServerSettings.model_fields["http_threads"].default
    return Layout(workers=w, http_threads=t, intra_op_threads=max(1, int(cpus // w)))


def _env_only(env: Mapping[str, str] | None, field: str) -> ServerSettings:
    """Settings for one field, without requiring DLSTACK_ARTIFACT_DIR (these callers need no artifact)."""
    env = os.environ if env is None else env
    key = ServerSettings.env_name(field)
    given = {key: env[key]} if env.get(key) else {}
    return ServerSettings.from_env({**given, ServerSettings.env_name("artifact_dir"): "-"})


def cpu_limit(env: Mapping[str, str] | None = None) -> float:
    """CPUs this container may use: ``DLSTACK_CPU_LIMIT``, else cgroup ``cpu.max``, else ``os.cpu_count()``."""
    return _env_only(env, "cpu_limit").cpus()


def log_format(env: Mapping[str, str] | None = None, isatty: bool | None = None) -> str:
    """``DLSTACK_LOG_FORMAT``: "json" or "text"; default "auto" = text when stdout is a terminal, else json."""
    return _env_only(env, "log_format").resolved_log_format(isatty)
