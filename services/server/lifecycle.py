"""Worker lifecycle: the draining flag and the gthread worker that sets it on SIGTERM.

On SIGTERM gunicorn's master closes its listeners and sends SIGTERM to every worker.
``DrainingWorker`` then flips readiness to 503 at once, keeps serving for
``DLSTACK_DRAIN_SECONDS`` (so load balancers see the 503 and stop routing here), then
lets gunicorn's graceful shutdown finish in-flight requests and exit.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from gunicorn.workers.gthread import ThreadWorker

_DRAINING = threading.Event()


def draining() -> bool:
    return _DRAINING.is_set()


def start_draining() -> None:
    _DRAINING.set()


class DrainingWorker(ThreadWorker):
    """A gthread worker whose SIGTERM first turns readiness off, then stops after the drain period."""

    def handle_exit(self, sig: int, frame: Any) -> None:
        if _DRAINING.is_set():
            return
        start_draining()
        self.log.info("SIGTERM: readiness is now 503; draining")
        delay = float(os.environ.get("DLSTACK_DRAIN_SECONDS") or 0)
        if delay <= 0:
            super().handle_exit(sig, frame)
            return
        timer = threading.Timer(delay, super().handle_exit, (sig, frame))
        timer.daemon = True
        timer.start()
