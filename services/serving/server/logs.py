"""ECS JSON log lines on stdout (ecs-logging): one access line per request, never a payload.

Gunicorn's own logger goes through the same formatter, so every stdout line is JSON. On a
terminal (or with ``DLSTACK_LOG_FORMAT=text``) the same lines are written as readable text
instead; ``config.log_format`` decides.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import sys
import threading
import time
from collections import deque
from typing import Any

import ecs_logging
import orjson
from gunicorn import glogging

from services.serving.server.settings import log_format

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


class LineBuffer:
    """Stdout lines of one process, written by a background thread in one ``os.write`` per few ms.

    Request threads only append to a deque: one write syscall per request (it releases and retakes
    the GIL) cost a tenth of a busy worker's time. Nothing is lost at a normal exit: ``flush`` runs
    at exit (``atexit``, gunicorn's ``worker_exit``) and before any other line of this process, so
    lines keep their order. Only a killed process (SIGKILL) can lose its last few ms of lines.
    """

    def __init__(self, fd: int, interval: float = 0.005) -> None:
        self.fd = fd
        self.interval = interval  # s the flusher waits for more lines after the first one
        self._lines: deque[bytes] = deque()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._pid = 0  # the process whose flusher thread runs; a forked child starts its own
        self._loop: asyncio.AbstractEventLoop | None = (
            None  # set by flush_on: the event loop whose thread flushes its own lines
        )
        self._loop_thread = 0
        self._loop_due = False  # a flush timer of that loop is pending
        os.register_at_fork(after_in_child=self._after_fork)
        atexit.register(self.flush)

    def _after_fork(self) -> None:
        self._lines.clear()  # the parent writes these
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._pid = 0
        self._loop = None
        self._loop_thread = 0
        self._loop_due = False

    def flush_on(self, loop: asyncio.AbstractEventLoop) -> None:
        """Lines put by this thread, which runs ``loop``, wake the flusher thread from a loop timer, not per line.

        Waking the flusher thread for each line and handing it the GIL cost an event-loop worker ~8 us
        of CPU per request on 2 cores; one wake per timer tick costs a fraction of that.
        """
        self._loop = loop
        self._loop_thread = threading.get_ident()

    def _loop_flush(self) -> None:
        # The write itself stays on the flusher thread: stdout may block (a stalled log reader), and a
        # blocked loop would stop serving. One wake per timer, not one per line, is what saves the CPU.
        self._loop_due = False
        if self._pid != os.getpid():
            self._start()
        self._wake.set()

    def put(self, line: bytes) -> None:
        self._lines.append(line)
        if self._loop is not None and threading.get_ident() == self._loop_thread:
            if not self._loop_due:
                self._loop_due = True
                self._loop.call_later(self.interval, self._loop_flush)
            return
        if self._pid != os.getpid():
            self._start()
        if not self._wake.is_set():
            self._wake.set()

    def _start(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()
        threading.Thread(target=self._run, name="dlstack-log-flush", daemon=True).start()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            time.sleep(self.interval)
            self.flush()

    def flush(self, then: bytes = b"") -> None:
        """Write the pending lines, then ``then``, in order."""
        with self._lock:
            n = len(self._lines)
            if n == 0 and not then:
                return
            pop = self._lines.popleft
            data = b"".join([pop() for _ in range(n)]) + then
            with contextlib.suppress(OSError):  # stdout is gone (closed pipe): nothing left to tell
                _write_all(self.fd, data)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class LineHandler(logging.Handler):
    """Writes each record on stdout after the pending lines of the ``LineBuffer``, without the handler lock.

    The buffer's lock orders the writes of all threads; records are rare (lifecycle, errors), so
    they are written at once rather than buffered.
    """

    def __init__(self, buffer: LineBuffer) -> None:
        super().__init__()
        self.buffer = buffer

    def handle(self, record: logging.LogRecord) -> bool:  # type: ignore[override]
        if self.filter(record):
            self.emit(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.buffer.flush((self.format(record) + "\n").encode())
        except Exception:
            self.handleError(record)


class TextFormatter(logging.Formatter):
    """One readable line per record for a person at a terminal: local time, level, message.

    Access records become ``POST /v2/models/m/infer 200 1.23 ms (m:1, id ...)``; tracebacks follow
    their line, as Python prints them.
    """

    default_msec_format = "%s.%03d"

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "ecs", None)
        if fields is None:
            return super().format(record)
        return text_access_line(record.created, record.levelno, fields).decode().rstrip("\n")


def text_access_line(now: float, level: int, fields: dict[str, Any]) -> bytes:
    """The readable form of an access line (the fields ``access`` builds), newline included."""
    http = fields["http"]
    labels = fields["labels"]
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + f".{int((now % 1) * 1000):03d}"
    line = (
        f"{stamp} {logging.getLevelName(level):<7} {http['request']['method']} {fields['url']['path']} "
        f"{http['response']['status_code']} {fields['event']['duration'] / 1e6:.2f} ms "
        f"({labels['model']}:{labels['model_version']}, id {http['request']['id']})"
    )
    if "error" in fields:
        line += f": {fields['error']['message']}"
    return (line + "\n").encode()


def formatter(fmt: str = "json") -> logging.Formatter:
    """``fmt`` is what ``config.log_format`` returns: "json" (ECS) or "text"."""
    if fmt == "text":
        return TextFormatter()
    return Formatter(extra={"service.name": SERVICE_NAME}, exclude_fields=_EXCLUDE)


_BUFFER: LineBuffer | None = None  # this process's stdout buffer, when stdout is a real file descriptor


def stdout_buffer() -> LineBuffer | None:
    global _BUFFER
    if _BUFFER is None:
        try:
            _BUFFER = LineBuffer(sys.stdout.fileno())
        except (AttributeError, OSError, ValueError):  # stdout replaced by an in-memory stream (tests, notebooks)
            return None
    return _BUFFER


def flush_on(loop: asyncio.AbstractEventLoop) -> None:
    """The calling thread runs ``loop``: its stdout lines are flushed by the loop (see ``LineBuffer.flush_on``)."""
    if _BUFFER is not None:
        _BUFFER.flush_on(loop)


def flush() -> None:
    """Write the buffered stdout lines now (gunicorn's ``worker_exit`` calls it)."""
    if _BUFFER is not None:
        _BUFFER.flush()


def _stdout_handler() -> logging.Handler:
    sys.stdout.flush()  # anything print()ed before must come first
    buffer = stdout_buffer()
    handler = LineHandler(buffer) if buffer is not None else logging.StreamHandler(sys.stdout)
    handler.setFormatter(formatter(log_format()))
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
    global _FAST_ACCESS, _TEXT
    _FAST_ACCESS = _fast_access()
    _TEXT = isinstance(handler.formatter, TextFormatter)


class GunicornLogger(glogging.Logger):
    """gunicorn's ``logger_class``: its error log as ECS JSON (or text) on stdout, its access log off.

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
    level = logging.ERROR if status >= 500 else logging.WARNING if status >= 400 else logging.INFO
    if not access_log.isEnabledFor(level):
        return
    if error is None and _FAST_ACCESS and not _TEXT and _BUFFER is not None:
        _BUFFER.put(access_json(time.time(), level, model, version, request_id, method, path, status, duration_ns))
        return
    fields: dict[str, Any] = {
        "labels": {"model": model, "model_version": version},
        "http": {"request": {"id": request_id, "method": method}, "response": {"status_code": status}},
        "url": {"path": path},
        "event": {"duration": duration_ns, "dataset": ACCESS_DATASET},
    }
    if error is not None:
        fields["error"] = {"message": error, "type": error_type or "DlstackError"}
    message = f"{method} {path} {status}"
    if _FAST_ACCESS and _BUFFER is not None:
        if _TEXT:
            _BUFFER.put(text_access_line(time.time(), level, fields))
        else:
            _BUFFER.put(access_line(time.time(), os.getpid(), level, message, fields))
    else:
        access_log.log(level, "%s", message, extra={"ecs": fields})


_FAST_ACCESS = False  # set by setup(): the access logger writes through our one stdout handler only
_TEXT = False  # set by setup(): that handler writes readable text, not ECS JSON


def _fast_access() -> bool:
    handlers = [h for lg in (access_log, logging.getLogger("dlstack")) for h in lg.handlers]
    return len(handlers) == 1 and isinstance(handlers[0], LineHandler) and not access_log.filters


_LEVELS = {logging.INFO: "info", logging.WARNING: "warning", logging.ERROR: "error"}
_second: tuple[int, str] = (-1, "")  # the last formatted UTC second: strftime once per second, not per line


def access_line(now: float, pid: int, level: int, message: str, fields: dict[str, Any]) -> bytes:
    """The line ``Formatter`` writes for an access record, built directly with orjson (no LogRecord).

    Same keys, values and order (``@timestamp``, ``log.level``, ``message``, then sorted keys;
    ``fields`` are nested ECS dicts whose keys are already sorted or get sorted here);
    a test proves it equal to the formatter's output.
    """
    doc: dict[str, Any] = {
        "@timestamp": timestamp(now),
        "log.level": _LEVELS.get(level) or logging.getLevelName(level).lower(),
        "message": message,
    }
    rest: dict[str, Any] = {
        "ecs.version": ecs_logging.ECS_VERSION,
        "log": {"logger": access_log.name},
        "process": {"pid": pid},
        "service": {"name": SERVICE_NAME},
        **fields,
    }
    head = orjson.dumps(doc)
    body = orjson.dumps(rest, option=orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE)
    return head[:-1] + b"," + body[1:]


def timestamp(now: float) -> str:
    """ecs-logging's ``@timestamp`` of ``now``: UTC, milliseconds, "Z"."""
    global _second
    sec = int(now)
    cached = _second
    if cached[0] != sec:
        cached = _second = (sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)))
    return f"{cached[1]}.{int((now - sec) * 1000):03d}Z"


_tails: dict[tuple[str, str, str, int], bytes] = {}


def process_tail(logger: str, model: str, version: str) -> bytes:
    """The keys of a model's line that only change with the process, in sorted order and without braces:
    ``labels``, ``log``, ``process``, ``service`` (they sort after the per-event keys of access and
    prediction lines). Encoded once per process instead of once per line."""
    key = (logger, model, version, os.getpid())
    tail = _tails.get(key)
    if tail is None:
        tail = _tails[key] = orjson.dumps(
            {
                "labels": {"model": model, "model_version": version},
                "log": {"logger": logger},
                "process": {"pid": key[3]},
                "service": {"name": SERVICE_NAME},
            }
        )[1:-1]
    return tail


def access_json(
    now: float, level: int, model: str, version: str, rid: str, method: str, path: str, status: int, duration_ns: int
) -> bytes:
    """``access_line`` of an access without an error, from a template: the same bytes (a test compares them)
    at a third of the cost, as only the request's own values are encoded per line."""
    global _second
    sec = int(now)
    cached = _second
    if cached[0] != sec:  # timestamp()'s cache, inlined: this runs once per request
        cached = _second = (sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)))
    tail = process_tail(access_log.name, model, version)
    dumps = orjson.dumps
    return (
        b'{"@timestamp":"%s.%03dZ","log.level":"%s","message":%s,"ecs.version":%s,"event":{"dataset":"%s",'
        b'"duration":%d},"http":{"request":{"id":%s,"method":%s},"response":{"status_code":%d}},%s,'
        b'"url":{"path":%s}}\n'
        % (
            cached[1].encode(),
            int((now - sec) * 1000),
            (_LEVELS.get(level) or logging.getLevelName(level).lower()).encode(),
            dumps(f"{method} {path} {status}"),
            ECS_VERSION_JSON,
            ACCESS_DATASET.encode(),
            duration_ns,
            dumps(rid),
            dumps(method),
            status,
            tail,
            dumps(path),
        )
    )


ECS_VERSION_JSON = orjson.dumps(ecs_logging.ECS_VERSION)  # shared by the templated lines


def event(message: str, *, level: int = logging.INFO, **fields: Any) -> None:
    """A server lifecycle line (model load, drain ...), fields as ECS names with ``__`` for dots."""
    extra = {"event.dataset": SERVER_DATASET, **{k.replace("__", "."): v for k, v in fields.items()}}
    server_log.log(level, message, extra=extra)
