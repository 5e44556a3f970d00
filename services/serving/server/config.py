"""Former home of the server settings; ``services.serving.server.settings`` owns them now.

Kept as thin aliases so older imports (``ServerConfig(artifact_dir=...)`` in tests, ``log_format``)
keep working; new code imports ``settings``. No env var is parsed here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from services.serving.server.settings import (
    LOG_FORMATS,
    Layout,
    ServerSettings,
    cgroup_cpu_limit,
    layout,
)

ServerConfig = ServerSettings

__all__ = ["LOG_FORMATS", "Layout", "ServerConfig", "cgroup_cpu_limit", "cpu_limit", "layout", "log_format"]


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
