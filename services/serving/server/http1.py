"""HTTP/1.1 connections of the event-loop worker: parsing (httptools), pipelining, writing answers.

``HttpConnection`` owns the bytes of one client connection; the worker (``worker.EventLoopWorker``)
owns what a request means. The connection calls the worker's ``handle`` with each complete request
and writes what the worker hands to ``respond``.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from typing import TYPE_CHECKING

import httptools
import orjson
from gunicorn import util

from services.serving.errors import DlstackError
from services.serving.server.app import Reply, too_large

if TYPE_CHECKING:
    from services.serving.server.worker import EventLoopWorker

MAX_PIPELINED = 16  # requests queued on one connection before the worker stops reading it


class HttpError(DlstackError):
    """A request this worker rejects before any route sees it (bad framing, limits): ``HttpError(msg, status)``."""


class Request:
    """One HTTP request as the parser delivers it."""

    __slots__ = ("body", "headers", "keep_alive", "length", "method", "size", "t0", "url", "version")

    def __init__(self) -> None:
        self.t0 = time.perf_counter_ns()
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.body: list[bytes] = []
        self.size = 0
        self.method = b"GET"
        self.version = "1.1"
        self.keep_alive = True
        self.length: int | None = None

    def header(self, name: bytes) -> str | None:
        value = self.headers.get(name)
        return None if value is None else value.decode("latin-1")


class HttpConnection(asyncio.Protocol):
    """One client connection: parses requests, hands them to the worker one at a time, writes answers."""

    def __init__(self, worker: EventLoopWorker) -> None:
        self.w = worker
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.req: Request | None = None  # the request being received
        self.queue: deque[Request] = deque()  # received, waiting for the one in progress (pipelining)
        self.busy = False  # a request of this connection is being answered
        self.served = 0
        self.idle_since = time.monotonic()
        self.paused = False
        self.must_close = False  # the stream after the current request is not ours to parse (an Upgrade)

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.w.conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.w.conns.discard(self)
        self.w.nr_conns -= 1
        if self.req is not None:
            self.req = None
            self.w.batcher.request_arrived()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except HttpError as exc:
            self.fail(exc.status, exc.message)
        except httptools.HttpParserCallbackError as exc:  # httptools wraps what a callback raised
            cause = exc.__context__
            if isinstance(cause, HttpError):
                self.fail(cause.status, cause.message)
            else:
                self._internal_error(cause or exc)
        except httptools.HttpParserUpgrade:
            # RFC 9110 lets a server ignore Upgrade: the request is answered as plain HTTP/1.1 (an h2c client
            # carries on, a WebSocket client sees no 101), then the connection closes, as its bytes may no
            # longer be HTTP.
            self.must_close = True
            if self.idle and self.transport is not None:
                self.transport.close()
        except httptools.HttpParserError as exc:
            self.fail(400, f"malformed HTTP request ({exc}); send an HTTP/1.1 request")
        except Exception as exc:
            self._internal_error(exc)

    def _internal_error(self, exc: BaseException) -> None:
        """A bug of ours while reading a request: the log gets the traceback, the client a 500, the worker lives."""
        self.w.log.error("unhandled error while reading a request", exc_info=exc)
        self.fail(500, "internal error while reading the request; the server log has the details")

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.req = Request()
        self.w.batcher.arriving += 1

    def on_url(self, url: bytes) -> None:
        req = self.req
        assert req is not None
        req.url += url
        if len(req.url) > self.w.limit_line:
            raise HttpError(f"the request URL is over {self.w.limit_line} bytes", 414)

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self.req
        assert req is not None
        if len(name) + len(value) > self.w.limit_field_size:
            raise HttpError(f"header {name[:64].decode('latin-1')!r} is over {self.w.limit_field_size} bytes", 431)
        if len(req.headers) >= self.w.limit_fields:
            raise HttpError(f"the request has more than {self.w.limit_fields} header fields", 431)
        key = name.lower()
        old = req.headers.get(key)
        req.headers[key] = value if old is None else old + b", " + value

    def on_headers_complete(self) -> None:
        req = self.req
        assert req is not None
        parser = self.parser
        req.method = parser.get_method()
        req.version = parser.get_http_version()
        req.keep_alive = parser.should_keep_alive()
        if parser.should_upgrade():  # see data_received: answered as HTTP/1.1, then closed
            self.must_close = True
        raw = req.headers.get(b"content-length")
        if raw is not None:
            try:
                req.length = int(raw)
            except ValueError:
                raise HttpError(f"Content-Length {raw[:32]!r} is not a number", 400) from None
            if req.length > self.w.max_body_bytes:
                raise HttpError(too_large(req.length, self.w.max_body_bytes), 413)
        if req.headers.get(b"expect", b"").lower() == b"100-continue" and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # curl waits 1 s for this on big bodies

    def on_body(self, body: bytes) -> None:
        req = self.req
        assert req is not None
        req.size += len(body)
        if req.size > self.w.max_body_bytes:
            raise HttpError(too_large(req.length, self.w.max_body_bytes), 413)
        req.body.append(body)

    def on_message_complete(self) -> None:
        req = self.req
        assert req is not None
        self.req = None
        self.w.batcher.request_arrived()
        self.queue.append(req)
        if len(self.queue) > MAX_PIPELINED and self.transport is not None and not self.paused:
            self.paused = True
            self.transport.pause_reading()
        if not self.busy:
            self.next()

    # answering
    def next(self) -> None:
        if self.queue and not self.busy and self.transport is not None:
            self.busy = True
            self.w.handle(self, self.queue.popleft())
        if self.paused and len(self.queue) <= MAX_PIPELINED // 2 and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    def respond(self, req: Request, status: str, headers: list[tuple[str, str]] | str, body: bytes) -> bool:
        """Write one answer (headers and body in one write); returns whether the connection stays open."""
        w = self.w
        self.served += 1
        keep = (
            req.keep_alive
            and not w.stopping
            and not self.must_close
            and not (w.keepalive_requests and self.served >= w.keepalive_requests)
        )
        head = headers if isinstance(headers, str) else "".join(f"{k}: {v}\r\n" for k, v in headers)
        data = (
            f"HTTP/1.1 {status}\r\nServer: dlstack\r\nDate: {_http_date()}\r\n{head}"
            f"Connection: {'keep-alive' if keep else 'close'}\r\n\r\n"
        ).encode("latin-1")
        transport = self.transport
        if transport is not None:
            transport.write(data if req.method == b"HEAD" else data + body)
            if not keep:
                transport.close()
        self.busy = False
        self.idle_since = time.monotonic()
        if keep:
            self.next()
        return keep

    def fail(self, status: int, message: str) -> None:
        """Answer a request the parser rejected, then close: the rest of the stream cannot be trusted."""
        req = self.req or Request()
        if self.req is not None:
            self.req = None
            self.w.batcher.request_arrived()
        self.queue.clear()
        req.keep_alive = False
        if self.busy:  # an earlier pipelined request is still being answered: its answer cannot come after ours
            if self.transport is not None:
                self.transport.close()
            return
        self.busy = True
        rid = req.header(b"x-request-id")
        if not rid or len(rid) > 200:
            rid = os.urandom(16).hex()
        self.w.inflight += 1
        body = _error_body(message, rid if status >= 500 else None)
        self.w.finish(self, req, rid, "other", Reply(body, status), message, "HttpError")

    @property
    def idle(self) -> bool:
        return not self.busy and self.req is None and not self.queue


def _error_body(message: str, request_id: str | None = None) -> bytes:
    return orjson.dumps({"error": message} if request_id is None else {"error": message, "request_id": request_id})


_date: tuple[int, str] = (-1, "")


def _http_date() -> str:
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, util.http_date(now))
    return _date[1]
