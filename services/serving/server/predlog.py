"""Sampled prediction log: a fraction of the answered requests, with their tensors, as ECS JSON lines.

Opt-in per model (``prediction_log: {sample: 0.01, max_bytes: 4096}`` in the stack file, rendered into
``DLSTACK_PREDICTION_LOG_*`` and read through the server settings). The server samples (``inference.notify``,
one draw per answer); on the request's thread, a sampled request's ``Prediction`` (array references, not
copies: the one inference path never modifies arrays after the answer) is appended to a bounded queue
without waiting. When the queue is full (the log consumer stalls) the event is dropped and counted, so a
slow stdout never slows a request. One background thread per worker turns events into lines
(``event.dataset: dlstack.predictions``) in the layout of the server's other ECS lines and writes them to
stdout in order with them; Filebeat ships them and Logstash routes them to ``dlstack-predictions-*``.
It works a batch of events at a time: the summaries of same-shaped tensors are reduced in one numpy call
per statistic, since the writer shares the worker's GIL and CPU with the requests.

Inputs may be personal data: nothing is logged unless a rate is set, a request carrying
``X-Dlstack-Log: off`` is never logged, and an event whose line would exceed ``max_bytes`` carries
a summary per tensor (shape, min/max/mean, sha256 of its bytes) instead of the values. A graceful exit
writes what is still queued (for at most ``EXIT_FLUSH_S``); a killed worker loses it.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import orjson
from prometheus_client import Counter

from services.serving.artifact import Datatype
from services.serving.errors import UserError
from services.serving.server import logs
from services.serving.server.observe import NO_LOG_HEADER, Observer, Prediction, nbytes
from services.serving.server.protocol import Tensors
from services.serving.server.settings import ServerSettings

DATASET = "dlstack.predictions"
LOGGER = "dlstack.predictions"
# The ServerSettings defaults (prediction_log_sample, _max_bytes, _queue), documented there.
SAMPLE = ServerSettings.model_fields["prediction_log_sample"].default
MAX_BYTES = ServerSettings.model_fields["prediction_log_max_bytes"].default
QUEUE = ServerSettings.model_fields["prediction_log_queue"].default
# The queue holds references to request and answer arrays; this bounds the memory they keep alive
# while the consumer stalls (1000 queued 16 MiB image requests would otherwise pin 16 GB).
QUEUE_BYTES = 64 << 20
_BATCH = 256  # events written per stdout write at most
# s the writer sleeps between drains of the queue, unless half the queue fills first. Woken by every event
# instead, it cost a lock handoff and a GIL switch per sampled request, 2-3 % of a worker logging 100 %;
# each wake takes the GIL from the event loop, so an idle log should rarely wake.
_POLL_S = 0.25
EXIT_FLUSH_S = 2.0  # s a worker that exits gracefully waits for its queued events to be written
# Tensors up to this size are summarised together with the same-shaped tensors of their batch (one stacked
# copy, one reduction per statistic); bigger ones alone, so a batch never copies more than 256 x this.
_STACK_BYTES = 64 << 10

WRITTEN = Counter(
    "dlstack_prediction_log_written", "Prediction events written to the prediction log", ["model", "version"]
)
DROPPED = Counter(
    "dlstack_prediction_log_dropped",
    "Sampled prediction events not written: the queue was full (stdout stalled), or the event could not be",
    ["model", "version"],
)


class _Served(Protocol):
    """What ``install`` needs of the model server."""

    name: str
    version: str
    observers: list[Observer]


class PredictionLog:
    """An ``Observer``: queues the predictions it is handed and writes them from its own thread (module docstring).

    ``sink`` receives the lines of a batch of events, newline-terminated, and may block: only the writer
    thread waits. ``observe`` takes every prediction it is handed: ``inference.notify`` samples them.
    """

    def __init__(
        self,
        model: str,
        version: str,
        *,
        sample: float = SAMPLE,
        max_bytes: int = MAX_BYTES,
        queue_size: int = QUEUE,
        queue_bytes: int = QUEUE_BYTES,
        sink: Callable[[bytes], None] | None = None,
        text: bool = False,
    ) -> None:
        if not 0.0 <= sample <= 1.0:
            raise UserError(f"prediction_log_sample {sample} must be between 0 and 1 (e.g. 0.01 for 1 %)")
        if max_bytes < 256:
            raise UserError(
                f"prediction_log_max_bytes {max_bytes} must be >= 256 (below that, every event is a summary)"
            )
        if queue_size < 1:
            raise UserError(f"prediction_log_queue {queue_size} must be >= 1 event")
        self.model, self.version = model, version
        self.sample = sample
        self.max_bytes = max_bytes
        self.queue_bytes = queue_bytes
        self.text = text
        self.queue_size = queue_size
        self._sink = sink or stdout_sink
        # A deque and one lock rather than queue.Queue: its condition variables cost the request thread
        # ~2 us per event, and nothing ever waits for room (a full queue drops).
        self._queue: deque[tuple[Prediction, int]] = deque()
        self._lock = threading.Lock()  # the queue, _held and _unfinished
        self._held = 0  # bytes of arrays referenced by queued events
        self._unfinished = 0  # events queued or being written
        self._done = threading.Condition(threading.Lock())  # notified when the writer finished a batch
        self._wake = threading.Event()
        self._wake_at = max(1, queue_size // 2)  # queued events that wake the writer before its next poll
        self._pid = 0  # the process whose writer thread runs
        self._start_lock = threading.Lock()
        self.written = WRITTEN.labels(model, version)
        self.dropped = DROPPED.labels(model, version)

    # --- the request's thread: a header lookup, an append ----------------------------------------

    def observe(self, p: Prediction) -> None:
        if (off := p.headers.get(NO_LOG_HEADER)) is not None and off.strip().lower() == "off":
            return
        size = nbytes(p.inputs) + nbytes(p.outputs)
        with self._lock:
            queued = len(self._queue)
            full = queued >= self.queue_size or (self._held and self._held + size > self.queue_bytes)
            if not full:
                self._queue.append((p, size))
                self._held += size
                self._unfinished += 1
        if full:
            self.dropped.inc()
            return
        if self._pid != os.getpid():
            self._start()
        if queued + 1 == self._wake_at:  # a burst: wake the writer now rather than drop at its next poll
            self._wake.set()

    def _start(self) -> None:
        with self._start_lock:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()
        threading.Thread(target=self._run, name="dlstack-prediction-log", daemon=True).start()
        # A graceful exit (SIGTERM, max_requests) writes what is queued, but never waits long on a stalled stdout.
        atexit.register(self.flush, EXIT_FLUSH_S)

    # --- the writer thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            self._wake.wait(_POLL_S)
            self._wake.clear()
            while batch := self._take():
                try:
                    self.write(batch)
                finally:
                    with self._lock:
                        self._unfinished -= len(batch)
                    with self._done:
                        self._done.notify_all()

    def _take(self) -> list[tuple[Prediction, int]]:
        with self._lock:
            pop = self._queue.popleft
            return [pop() for _ in range(min(_BATCH, len(self._queue)))]

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the queued events to be written; False if some are still pending."""
        deadline = time.monotonic() + timeout
        with self._done:
            while self._unfinished:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._done.wait(min(left, 0.05))  # _unfinished is not read under _done's lock
        return True

    def write(self, batch: Sequence[tuple[Prediction, int]]) -> None:
        """Turn a batch of queued events into lines and hand them to the sink in one call."""
        lines: list[bytes] = []
        try:
            for p, line in zip((p for p, _ in batch), self.lines([p for p, _ in batch]), strict=True):
                if isinstance(line, Exception):  # a bad event must not stop the log; say why once per event
                    self.dropped.inc()
                    logs.server_log.warning(
                        "prediction log: event of request %s not written: %s: %s",
                        p.request_id,
                        type(line).__name__,
                        line,
                    )
                else:
                    lines.append(line)
        finally:
            with self._lock:
                self._held -= sum(size for _, size in batch)
        if lines:
            try:
                self._sink(b"".join(lines))
            except Exception:  # stdout is gone (closed pipe): nothing left to tell, nowhere to tell it
                self.dropped.inc(len(lines))
                return
            self.written.inc(len(lines))

    def line(self, p: Prediction, now: float | None = None) -> bytes:
        """The event's line: full tensors, or their summaries when that line would exceed ``max_bytes``.

        A summary line is written even if it is longer: its size grows with the number of tensors (fixed by
        the signature), never with their contents.
        """
        (out,) = self.lines([p], now)
        if isinstance(out, Exception):
            raise out
        return out

    def lines(self, events: Sequence[Prediction], now: float | None = None) -> list[bytes | Exception]:
        """``line`` of each event (or the exception that event raised), the summaries computed together."""
        now = time.time() if now is None else now
        out: list[bytes | Exception | None] = [None] * len(events)
        summarise: list[int] = []
        for i, p in enumerate(events):
            try:
                if _fits(p, self.max_bytes):
                    line = self._line(p, now, "full", _tensors(p.inputs), _tensors(p.outputs))
                    if len(line) <= self.max_bytes:
                        out[i] = line
                        continue
                summarise.append(i)
            except Exception as exc:
                out[i] = exc
        if summarise:
            tensors = [t for i in summarise for t in (events[i].inputs, events[i].outputs)]
            summaries: list[Any]
            try:
                summaries = summaries_of(tensors)
            except Exception:  # one bad event must not cost the others theirs: summarise them one by one
                summaries = [_summaries_or_error(ts) for ts in tensors]
            for k, i in enumerate(summarise):
                try:
                    for part in summaries[2 * k : 2 * k + 2]:
                        if isinstance(part, Exception):
                            raise part
                    out[i] = self._line(events[i], now, "summary", summaries[2 * k], summaries[2 * k + 1])
                except Exception as exc:
                    out[i] = exc
        return [x if x is not None else RuntimeError("no line") for x in out]

    def _line(self, p: Prediction, now: float, form: str, inputs: Any, outputs: Any) -> bytes:
        if self.text:
            return text_line(now, message(p), p, event_fields(p, form, inputs, outputs))
        return ecs_line(now, p, form, inputs, outputs)


def message(p: Prediction) -> str:
    return f"prediction {p.model}:{p.version} {p.status}"


def event_fields(p: Prediction, form: str, inputs: Any, outputs: Any) -> dict[str, Any]:
    """The ECS fields of one event (nested dicts); ``infra.logstash.PREDICTION_FIELDS`` names them."""
    return {
        "labels": {"model": p.model, "model_version": p.version},
        "http": {"request": {"id": p.request_id}, "response": {"status_code": p.status}},
        "event": {"dataset": DATASET, "duration": int(p.latency_s * 1e9)},
        "dlstack": {
            "prediction": {
                "form": form,
                "latency_ms": round(p.latency_s * 1000, 3),
                "inputs": inputs,
                "outputs": outputs,
            }
        },
    }


def ecs_line(now: float, p: Prediction, form: str, inputs: Any, outputs: Any) -> bytes:
    """The line ``logs.Formatter`` (ecs-logging) writes for a record of the ``dlstack.predictions`` logger
    carrying ``event_fields(p, form, inputs, outputs)`` (a test proves the two equal), from a template as
    ``logs.access_json`` does: only the event's own values are encoded, and orjson writes the numpy arrays
    without a conversion to lists."""
    dumps = orjson.dumps
    prediction = dumps(
        {"form": form, "inputs": inputs, "latency_ms": round(p.latency_s * 1000, 3), "outputs": outputs},
        option=orjson.OPT_SORT_KEYS | orjson.OPT_SERIALIZE_NUMPY,
    )
    return (
        b'{"@timestamp":"%s","log.level":"info","message":%s,"dlstack":{"prediction":%s},"ecs.version":%s,'
        b'"event":{"dataset":"%s","duration":%d},"http":{"request":{"id":%s},"response":{"status_code":%d}},%s}\n'
        % (
            logs.timestamp(now).encode(),
            dumps(message(p)),
            prediction,
            logs.ECS_VERSION_JSON,
            DATASET.encode(),
            int(p.latency_s * 1e9),
            dumps(p.request_id),
            p.status,
            logs.process_tail(LOGGER, p.model, p.version),
        )
    )


def text_line(now: float, message: str, p: Prediction, fields: dict[str, Any]) -> bytes:
    """A person's terminal (``log_format`` text): the access line's layout, then the tensors as JSON."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + f".{int((now % 1) * 1000):03d}"
    pred = fields["dlstack"]["prediction"]
    tensors = orjson.dumps(
        {"inputs": pred["inputs"], "outputs": pred["outputs"]}, option=orjson.OPT_SERIALIZE_NUMPY
    ).decode()
    return (
        f"{stamp} INFO    {message} {p.latency_s * 1000:.2f} ms (id {p.request_id}, {pred['form']}): {tensors}\n"
    ).encode()


@functools.lru_cache(maxsize=32)
def _datatype(dtype: np.dtype[Any]) -> str:
    """``protocol.datatype_of`` per dtype, remembered: it scans the V2 table (~5 us), twice per event."""
    return Datatype.from_numpy(dtype).value


# The fewest bytes orjson writes per element, separator included: a float is never shorter than "0.0," (or
# "1e-7,", "null,"), an int "0,", a bool "true,", a string '"",'. A tensor with more than max_bytes of that
# lower bound is summarised without serialising its values first (the writer thread's costliest step).
_MIN_JSON_BYTES = {"f": 4, "c": 4, "b": 5, "i": 2, "u": 2, "O": 3}


def _fits(p: Prediction, max_bytes: int) -> bool:
    """Cheap pre-check: whether the values could fit in ``max_bytes`` at their shortest JSON forms."""
    # A JSON request whose body alone is over the bound cannot fit once its inputs are written again:
    # summarised without serialising anything (a 784-float row is under the per-element bound below).
    length = p.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_bytes and "inference-header-content-length" not in p.headers:
        return False
    least = sum(
        a.size * _MIN_JSON_BYTES.get(a.dtype.kind, 2) for ts in (p.inputs, p.outputs) if ts for a in ts.values()
    )
    return least <= max_bytes


def _tensors(ts: Tensors | None) -> list[dict[str, Any]] | None:
    """V2 JSON tensors: name, datatype, shape, flat row-major data."""
    if ts is None:
        return None
    return [
        {"name": name, "datatype": _datatype(arr.dtype), "shape": list(arr.shape), "data": _data(arr)}
        for name, arr in ts.items()
    ]


def _data(arr: np.ndarray) -> Any:
    if arr.dtype.kind == "O":  # BYTES: text as the V2 JSON form writes it; other bytes escaped, not lost
        return [b.decode("utf-8", "backslashreplace") if isinstance(b, bytes) else str(b) for b in arr.ravel()]
    return np.ascontiguousarray(arr).ravel()


def _summaries(ts: Tensors | None) -> list[dict[str, Any]] | None:
    if ts is None:
        return None
    return [summary(name, arr) for name, arr in ts.items()]


def _summaries_or_error(ts: Tensors | None) -> list[dict[str, Any]] | Exception | None:
    try:
        return _summaries(ts)
    except Exception as exc:
        return exc


def summaries_of(tensors: Sequence[Tensors | None]) -> list[list[dict[str, Any]] | None]:
    """``_summaries`` of each entry, with the min/max/mean of small same-typed, same-shaped tensors computed
    on one stacked array: per tensor, numpy's call overhead (~3 us a reduction) was most of the writer's cost."""
    out: list[list[dict[str, Any]] | None] = [None if ts is None else [] for ts in tensors]
    # (dtype, shape) -> the summaries list and index each member's summary goes to, its name and its array
    stacks: dict[tuple[np.dtype[Any], tuple[int, ...]], list[tuple[list[Any], int, str, np.ndarray]]] = {}
    for ts, summaries in zip(tensors, out, strict=True):
        if ts is None or summaries is None:
            continue
        for name, arr in ts.items():
            if arr.dtype.kind == "O" or not arr.size or arr.nbytes > _STACK_BYTES or not arr.ndim:
                summaries.append(summary(name, arr))
                continue
            members = stacks.get(key := (arr.dtype, arr.shape))
            if members is None:
                members = stacks[key] = []
            members.append((summaries, len(summaries), name, arr))
            summaries.append({})  # replaced below: each summary stays in its tensor's place
    for (dtype, shape), members in stacks.items():
        # Same shape, row-major: concatenated along the first axis, row k of the reshape is member k's array.
        rows = np.concatenate([m[3] for m in members]).reshape(len(members), -1)
        datatype = _datatype(dtype)
        with np.errstate(all="ignore"):
            lows, highs = rows.min(axis=1).tolist(), rows.max(axis=1).tolist()
            means = rows.mean(axis=1, dtype=np.float64).tolist()
        for (summaries, i, name, arr), lo, hi, mean in zip(members, lows, highs, means, strict=True):
            summaries[i] = {
                "name": name,
                "datatype": datatype,
                "shape": list(shape),
                "min": float(lo),
                "max": float(hi),
                "mean": mean,
                "sha256": _sha256_holding_gil(arr),
            }
    return out


# hashlib releases the GIL while it hashes 2048 bytes or more. For a small tensor that hands the GIL to the
# event loop and takes it back ~4 us later: two forced switches per event, which cost the loop more than the
# hash. Fed in smaller pieces, the hash keeps the GIL (a big tensor, over _STACK_BYTES, is hashed in one go).
_HASH_PIECE = 2047


def _sha256_holding_gil(arr: np.ndarray) -> str:
    """The sha256 of a (non-object) array's row-major bytes, as ``summary`` writes it."""
    # A copy (at most _STACK_BYTES): cheaper than the numpy calls that make a contiguous byte view.
    data = arr.tobytes()
    if len(data) <= _HASH_PIECE:
        return hashlib.sha256(data).hexdigest()
    h = hashlib.sha256()
    view = memoryview(data)
    for start in range(0, len(data), _HASH_PIECE):
        h.update(view[start : start + _HASH_PIECE])
    return h.hexdigest()


def summary(name: str, arr: np.ndarray) -> dict[str, Any]:
    """Per tensor: name, datatype, shape, min/max/mean (numbers only; None when empty) and the sha256
    of its bytes (row-major; BYTES elements length-prefixed as in the V2 binary extension)."""
    out: dict[str, Any] = {"name": name, "datatype": _datatype(arr.dtype), "shape": list(arr.shape)}
    if arr.dtype.kind == "O":
        digest = hashlib.sha256(_bytes_elements(arr)).hexdigest()
        out.update(min=None, max=None, mean=None)
    else:
        # Hashed and reduced in place: a bytes copy and a float64 copy of every tensor cost the writer thread
        # about as much as the hash and the reductions themselves.
        digest = hashlib.sha256(np.ascontiguousarray(arr).data).hexdigest()
        if arr.size:
            with np.errstate(all="ignore"):
                out.update(min=float(arr.min()), max=float(arr.max()), mean=float(arr.mean(dtype=np.float64)))
        else:
            out.update(min=None, max=None, mean=None)
    out["sha256"] = digest
    return out


def _bytes_elements(arr: np.ndarray) -> bytes:
    parts = []
    for item in arr.ravel():
        b = item if isinstance(item, bytes) else str(item).encode()
        parts += [len(b).to_bytes(4, "little"), b]
    return b"".join(parts)


def stdout_sink(data: bytes) -> None:
    """Writes after the pending stdout lines of this process, in one write; blocks while stdout is full.

    Only the prediction log's own thread calls it, so a stalled stdout fills its queue (events are then
    dropped and counted), never a request's thread.
    """
    buffer = logs.stdout_buffer()
    if buffer is not None:
        buffer.flush(data)
        return
    sys.stdout.write(data.decode())  # stdout replaced by an in-memory stream (tests, notebooks)
    sys.stdout.flush()


def install(server: _Served, settings: ServerSettings) -> PredictionLog | None:
    """Register a prediction log on ``server.observers`` when ``settings.prediction_log_sample`` > 0; else None."""
    if settings.prediction_log_sample <= 0.0:
        return None
    log = PredictionLog(
        server.name,
        server.version,
        sample=settings.prediction_log_sample,
        max_bytes=settings.prediction_log_max_bytes,
        queue_size=settings.prediction_log_queue,
        text=_stdout_is_text(),
    )
    server.observers.append(log)
    logs.event(
        f"prediction log on: {log.sample * 100:g}% of requests, lines up to {log.max_bytes} bytes",
        labels__model=server.name,
        labels__model_version=server.version,
    )
    return log


def _stdout_is_text() -> bool:
    """Whether the server's stdout lines are readable text (``log_format`` text), as ``logs.setup`` chose."""
    handlers = logging.getLogger("dlstack").handlers
    return any(isinstance(h.formatter, logs.TextFormatter) for h in handlers)
