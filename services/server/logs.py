"""ECS JSON log lines on stdout (ecs-logging): one access line per request, never a payload.

Gunicorn's own logger goes through the same formatter, so every stdout line is JSON.
"""

from __future__ import annotations

import logging
import os
import select
import sys
from typing import Any

import ecs_logging
import orjson
from gunicorn import glogging

SERVICE_NAME = "dlstack-model-server"
ACCESS_DATASET = "dlstack.access"
SERVER_DATASET = "dlstack.server"
# Source locations and thread names cost time on every line and help nobody reading access logs.
_EXCLUDE = ("log.origin", "process.thread", "process.name", "process.parent", "log.original")

access_log = logging.getLogger("dlstack.access")
server_log = logging.getLogger("dlstack.server")


class Formatter(ecs_logging.StdlibFormatter):
    """ecs-logging's formatter with a fast path for access lines, which carry their fields pre-nested.

    The generic path extracts, flattens, de-dots and merges ~20 fields per record and dumps
    with the stdlib json: a third of a small request's CPU time. Access records already hold
    the nested ECS dict (``record.ecs``) and are dumped with orjson in ecs-logging's layout
    (``@timestamp``, ``log.level``, ``message`` first, then the rest with sorted keys).
    """

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "ecs", None) is None:
            return super().format(record)
        doc = self.format_to_ecs(record)
        head = {
            "@timestamp": doc.pop("@timestamp"),
            "log.level": doc["log"].pop("level"),
            "message": doc.pop("message"),
        }
        rest = orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)
        return (orjson.dumps(head)[:-1] + b"," + rest[1:]).decode()

    def format_to_ecs(self, record: logging.LogRecord) -> dict[str, Any]:
        fields = getattr(record, "ecs", None)
        if fields is None:
            return super().format_to_ecs(record)
        return {
            "@timestamp": self._record_timestamp(record),
            "log": {"level": record.levelname.lower(), "logger": record.name},
            "message": record.getMessage(),
            "ecs.version": ecs_logging.ECS_VERSION,
            "process": {"pid": record.process},
            "service": {"name": SERVICE_NAME},
            **fields,
        }


class LineHandler(logging.Handler):
    """One ``os.write`` per record on stdout, without the per-record handler lock.

    A write of at most PIPE_BUF bytes to a pipe is atomic, so lines from many threads and
    worker processes never interleave; only longer lines take the lock. Under load the
    lock and the flush of a StreamHandler cost a fifth of a worker's time.
    """

    def __init__(self, fd: int = 1) -> None:
        super().__init__()
        self.fd = fd

    def handle(self, record: logging.LogRecord) -> bool:  # type: ignore[override]
        if self.filter(record):
            self.emit(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record) + "\n").encode()
            if len(data) <= select.PIPE_BUF:
                _write_all(self.fd, data)
            else:
                with self.lock:  # type: ignore[union-attr]
                    _write_all(self.fd, data)
        except Exception:
            self.handleError(record)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def formatter() -> logging.Formatter:
    return Formatter(extra={"service.name": SERVICE_NAME}, exclude_fields=_EXCLUDE)


def _stdout_handler() -> logging.Handler:
    sys.stdout.flush()  # anything print()ed before must come first
    handler: logging.Handler
    try:
        handler = LineHandler(sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):  # stdout replaced by an in-memory stream (tests, notebooks)
        handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(formatter())
    return handler


def setup() -> None:
    """Idempotent: one stdout handler on the ``dlstack`` logger."""
    root = logging.getLogger("dlstack")
    if any(getattr(h, "_dlstack", False) for h in root.handlers):
        return
    handler = _stdout_handler()
    handler._dlstack = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = False


class GunicornLogger(glogging.Logger):
    """gunicorn's ``logger_class``: its error log as ECS JSON on stdout, its access log off.

    The app writes the one access line per request. (A ``logconfig_dict`` would also make
    gunicorn build its own access-log atoms for every request, only to drop them.)
    """

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        self._access_log_enabled = False
        for h in list(self.error_log.handlers):
            if getattr(h, "_gunicorn", False):
                self.error_log.removeHandler(h)
        handler = _stdout_handler()
        handler._gunicorn = True  # type: ignore[attr-defined]
        self.error_log.addHandler(handler)

    def access(self, *args: Any, **kwargs: Any) -> None:
        return None


def access(
    *,
    model: str,
    version: str,
    request_id: str,
    method: str,
    path: str,
    status: int,
    duration_ns: int,
    error: str | None = None,
    error_type: str | None = None,
) -> None:
    fields: dict[str, Any] = {
        "labels": {"model": model, "model_version": version},
        "http": {"request": {"id": request_id, "method": method}, "response": {"status_code": status}},
        "url": {"path": path},
        "event": {"duration": duration_ns, "dataset": ACCESS_DATASET},
    }
    if error is not None:
        fields["error"] = {"message": error, "type": error_type or "DlstackError"}
    level = logging.ERROR if status >= 500 else logging.WARNING if status >= 400 else logging.INFO
    access_log.log(level, "%s %s %d", method, path, status, extra={"ecs": fields})


def event(message: str, *, level: int = logging.INFO, **fields: Any) -> None:
    """A server lifecycle line (model load, drain ...), fields as ECS names with ``__`` for dots."""
    extra = {"event.dataset": SERVER_DATASET, **{k.replace("__", "."): v for k, v in fields.items()}}
    server_log.log(level, message, extra=extra)
