"""The draining flag: set on SIGTERM, it turns readiness to 503 while the worker finishes its work.

The worker (``services.serving.server.worker``) sets it; the app reads it in ``/v2/health/ready`` and
the model readiness routes. It is per process: every worker gets its own SIGTERM from gunicorn.
"""

from __future__ import annotations

import threading

_DRAINING = threading.Event()


def draining() -> bool:
    return _DRAINING.is_set()


def start_draining() -> None:
    _DRAINING.set()
