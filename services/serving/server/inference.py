"""The one inference path (decode -> batch -> forward -> encode) and the one per-request bookkeeping.

Every front end answers the inference routes of ``routes.TABLE`` here: ``infer_async`` on an event
loop (the worker, the ASGI app: decoded on the loop, batched by a ``LoopBatcher``, answered on
completion) and ``infer_sync`` in a thread (the WSGI app, and any request that arrives while the
model is still loading: it waits for the load there). Both make the same checks in the same order,
so a bad request gets the same status and message from every front end.

``record`` counts a request and writes its access line (before the answer is written, so a scrape
right after an answer finds it counted); ``notify`` hands an inference answer to the server's
observers (after it is written).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from services.serving.errors import DlstackError, PayloadTooLarge, UserError
from services.serving.server import logs
from services.serving.server.observe import Prediction
from services.serving.server.routes import TABLE, Call, Reply, Route, error_reply

if TYPE_CHECKING:
    from services.serving.server.app import ModelServer
    from services.serving.server.batching import LoopBatcher
    from services.serving.server.protocol import Tensors

HEADER_LENGTH = "Inference-Header-Content-Length"
_BODY_TYPES = ("", "application/json", "application/octet-stream")


class UnsupportedMediaType(DlstackError):
    status = 415


def too_large(n: int | None, limit: int) -> str:
    size = f"{n} bytes," if n is not None else "chunked and"
    return (
        f"request body is {size} over the {limit}-byte limit; send fewer rows per request, use the "
        "binary tensor extension, or raise serving.max_body_bytes / --max-body-bytes"
    )


def check_body(content_type: str, body: bytes, limit: int) -> bytes:
    """The request body of an inference route, or the 4xx that says what to send instead."""
    ctype = content_type.split(";", 1)[0].strip().lower()
    if ctype not in _BODY_TYPES and not ctype.endswith("+json"):
        raise UnsupportedMediaType(
            f"Content-Type {ctype!r} is not supported; send application/json (or application/octet-stream "
            f"with the {HEADER_LENGTH} header for binary tensors)"
        )
    if len(body) > limit:
        raise PayloadTooLarge(too_large(len(body), limit))
    if not body:
        raise UserError("the request body is empty; send a JSON inference request")
    return body


def _prepare(s: ModelServer, call: Call) -> bytes:
    """The checks before decoding, in the one order: model and version, readiness, body."""
    params = call.params
    s.check(params["name"], params.get("version"))
    call.sig = s.require_ready()
    return check_body(call.headers.get("content-type") or "", call.body, s.max_body_bytes)


def _decode(route: Route, call: Call, body: bytes) -> Tensors:
    sig = call.sig
    assert sig is not None
    if route.v1:
        call.inputs = sig.decode_v1(body)
    else:
        req = call.decoded = sig.decode(body, call.headers.get("inference-header-content-length"))
        call.inputs = req.inputs
    return call.inputs


def _encode(call: Call, outputs: Tensors) -> Reply:
    sig = call.sig
    assert sig is not None
    call.outputs = outputs
    if call.decoded is None:
        return Reply(sig.encode_v1(outputs))
    data, json_len = sig.encode(call.decoded, outputs)
    if json_len is None:
        return Reply(data)
    return Reply(data, 200, "application/octet-stream", ((HEADER_LENGTH, str(json_len)),))


def infer_sync(s: ModelServer, route: Route, call: Call) -> Reply:
    """Answer an inference call in this thread; waits for a model that is still loading. Raises on errors."""
    body = _prepare(s, call)
    batcher = s.batcher
    if not batcher.enabled:
        return _encode(call, s.forward(_decode(route, call, body)))
    batcher.begin()  # a leader may wait for this request while it decodes
    try:
        inputs = _decode(route, call, body)
    except BaseException:
        batcher.cancel()
        raise
    return _encode(call, batcher.submit(inputs))


def infer_async(s: ModelServer, route: Route, call: Call, batcher: LoopBatcher, done: Callable[[Reply], None]) -> None:
    """Answer an inference call on the event loop: ``done(reply)`` is called on the loop, errors included.

    Only for a loaded model (``s.loaded`` set): before that, the caller runs ``answer`` in a thread.
    """
    try:
        inputs = _decode(route, call, _prepare(s, call))
    except Exception as exc:
        done(error_reply(exc, call))
        return

    def finished(outputs: Tensors | None, error: BaseException | None) -> None:
        try:
            if error is not None:
                raise error
            assert outputs is not None
            reply = _encode(call, outputs)
        except Exception as exc:
            reply = error_reply(exc, call)
        done(reply)

    batcher.submit(inputs, finished)


def answer(s: ModelServer, route: Route, call: Call) -> Reply:
    """Answer a call in this thread (may block: WSGI, or a pool thread of an event-loop front end)."""
    call.route = route.name
    try:
        if route.handler is None:
            return infer_sync(s, route, call)
        return route.handler(s, call)
    except Exception as exc:
        return error_reply(exc, call)


def record(s: ModelServer, call: Call, status: int) -> None:
    """The request metrics and the access line of one request: every front end calls this once per request."""
    elapsed = call.elapsed_ns = time.perf_counter_ns() - call.t0
    m = s.metrics
    m.request(call.route, status, elapsed / 1e9)
    logs.access(
        model=m.model,
        version=m.version,
        request_id=call.request_id,
        method=call.method,
        path=call.path,
        status=status,
        duration_ns=elapsed,
        error=call.error,
        error_type=call.error_type,
    )


_log = logging.getLogger("dlstack.server")
_INFERENCE_ROUTES = frozenset(r.name for r in TABLE if r.handler is None)


def notify(s: ModelServer, call: Call, status: int, draw: Callable[[], float] = random.random) -> None:
    """Hand an inference answer to the observers that sample it (``observe``: one draw, shared).

    An answer no observer samples allocates nothing: at 1 % and 10 %, building a Prediction and calling
    each observer for every answer cost ~2 us of the event loop's ~250 us per request.
    """
    observers = s.observers
    if not observers or call.route not in _INFERENCE_ROUTES:
        return
    u = draw()
    p: Prediction | None = None
    for observer in observers:
        if u >= observer.sample:
            continue
        if p is None:
            p = Prediction(
                request_id=call.request_id,
                model=s.name,
                version=s.version,
                inputs=call.inputs,
                outputs=call.outputs if status == 200 else None,
                status=status,
                latency_s=call.elapsed_ns / 1e9,
                headers=call.headers,
            )
        try:
            observer.observe(p)
        except Exception:  # an observer must not raise; if one does, the answer is already gone: log it
            _log.exception("observer %r failed on request %s", observer, call.request_id)
