"""HTTP/1.1 connections of the event-loop worker: parsing (httptools), pipelining, writing answers.

``HttpConnection`` owns the bytes of one client connection; the worker (``worker.EventLoopWorker``)
owns what a request means. The connection calls the worker's ``handle`` with each complete request
and writes what the worker hands to ``respond``.

Hostile clients (limits from ``ServerSettings``, see README "Hostile clients"): header lines are
counted and measured while they arrive (431/414 then close, never a quadratic join nor an unbounded
buffer); a request whose headers or body stall past ``header_timeout_s``/``body_timeout_s`` gets a 408
and is closed (the worker's tick calls ``expire``); reading stops while unsent output is over
``write_buffer_bytes``; pipelined requests before a bad one are answered first, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from typing import TYPE_CHECKING

import httptools
import orjson
from gunicorn import util

from services.serving.errors import DlstackError
from services.serving.server.app import Reply, too_large
from services.serving.server.routes import request_id

if TYPE_CHECKING:
    from services.serving.server.worker import EventLoopWorker

MAX_PIPELINED = 16  # requests queued on one connection before the worker stops reading it
LINGER_S = 1.0  # s a connection closed by the server keeps discarding what the client still sends
SUPPORTED_VERSIONS = ("1.1", "1.0")


class HttpError(DlstackError):
    """A request this worker rejects before any route sees it (bad framing, limits): ``HttpError(msg, status)``."""


class Request:
    """One HTTP request as the parser delivers it."""

    __slots__ = ("body", "error", "fields", "headers", "keep_alive", "length", "method", "size", "t0", "url", "version")

    def __init__(self) -> None:
        self.t0 = time.perf_counter_ns()
        self.url = b""
        self.fields: list[tuple[bytes, bytes]] = []  # header lines as they came; joined once into ``headers``
        self.headers: dict[bytes, bytes] = {}
        self.body: list[bytes] = []
        self.size = 0
        self.method = b"GET"
        self.version = "1.1"
        self.keep_alive = True
        self.length: int | None = None
        self.error: tuple[int, str] | None = None  # set: not a request but the error answer that ends the stream

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
        self.must_close = False  # the stream after the current request is not ours to parse (an Upgrade)
        self.broken = False  # an error answer is queued: later bytes are never parsed
        self.in_head = False  # between a request's first byte and the end of its headers
        self.line = 0  # bytes of the header line still being received (no newline yet)
        self.deadline = 0.0  # monotonic s by which the request being received must progress; 0 = none
        self.upgraded: Request | None = None  # an Upgrade request whose body httptools skipped (see _upgrade)
        self.body_only = False  # the parser is reading the body of ``upgraded`` behind a made-up head
        self.pipeline_full = False
        self.write_full = False  # unsent output is over write_buffer_bytes (pause_writing)
        self.reading = True
        self.begun = False  # a request began during the current read
        self.lingering = False  # answered and half-closed: reading only to discard (see _linger)

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        limit = self.w.http.write_buffer_bytes
        with contextlib.suppress(NotImplementedError):  # a test double without flow control
            transport.set_write_buffer_limits(high=limit, low=limit // 4)  # type: ignore[attr-defined]
        self.w.conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.w.conns.discard(self)
        self.w.nr_conns -= 1
        for req in (self.req, self.upgraded):
            if req is not None:
                self.w.batcher.request_arrived(req)
        self.req = self.upgraded = None
        self.transport = None

    def pause_writing(self) -> None:
        self.write_full = True
        self._flow()

    def resume_writing(self) -> None:
        self.write_full = False
        self._flow()
        self.next()

    def _flow(self) -> None:
        """Read only while the client takes its answers and the pipeline has room."""
        want = self.lingering or not (self.write_full or self.pipeline_full or self.broken)
        if want != self.reading and self.transport is not None and not self.transport.is_closing():
            self.reading = want
            if want:
                self.transport.resume_reading()
                if self.req is not None:  # the client was not the one stalling meanwhile
                    h = self.w.http
                    self.deadline = time.monotonic() + (h.header_timeout_s if self.in_head else h.body_timeout_s)
            else:
                self.transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        if self.broken:
            return
        started = self.in_head
        self.begun = False
        try:
            self.parser.feed_data(data)
            if self.in_head:
                self._measure_line(data, started and not self.begun)
        except HttpError as exc:
            self.fail(exc.status, exc.message)
        except httptools.HttpParserCallbackError as exc:  # httptools wraps what a callback raised
            cause = exc.__context__
            if isinstance(cause, HttpError):
                self.fail(cause.status, cause.message)
            else:
                self._internal_error(cause or exc)
        except httptools.HttpParserUpgrade as exc:
            self._upgrade(data[exc.args[0] :])
        except httptools.HttpParserError as exc:
            if "version" in str(exc).lower() or self.parser.get_method() == b"PRI":  # HTTP/1.2, HTTP/2's preface
                self.fail(505, "this server speaks HTTP/1.1 (and 1.0) only; send an HTTP/1.1 request")
            else:
                self.fail(400, f"malformed HTTP request ({exc}); send an HTTP/1.1 request")
        except Exception as exc:
            self._internal_error(exc)

    def _measure_line(self, data: bytes, started: bool) -> None:
        """Bound the header line still being received, which httptools keeps growing in memory.

        When the head began in an earlier read, this read continues it, so the bytes after its last
        newline are exactly the open line. When it began in this read, bytes before it may belong to
        the previous request's body: the count starts at the next read (httptools holds at most one
        read of it meanwhile), while complete lines are checked in ``on_header``.
        """
        nl = data.rfind(b"\n")
        if not started:
            self.line = 0
        elif nl < 0:
            self.line += len(data)
        else:
            self.line = len(data) - nl - 1
        limit = self.w.limit_line
        if self.line > limit:  # a long request line is a long URL, which on_url answers with 414 first
            raise HttpError(f"a header line is over {limit} bytes; send shorter headers", 431)

    def _upgrade(self, rest: bytes) -> None:
        """RFC 9110 lets a server ignore Upgrade: the request is answered as plain HTTP/1.1, then the connection
        closes, as what the client sends after it may no longer be HTTP/1.1.

        httptools skips the body of an Upgrade request: a second parser reads it, behind a made-up head
        with the same framing, so the request is served with its body.
        """
        self.must_close = True
        req = self.upgraded
        if req is None:  # no body: the request is queued already; nothing after it is parsed
            self.broken = True
            self._flow()
            if self.idle and self.transport is not None:
                self.transport.close()
            return
        framing = b"Transfer-Encoding: chunked" if req.length is None else b"Content-Length: %d" % req.length
        self.body_only = True
        self.parser = httptools.HttpRequestParser(self)
        self.parser.feed_data(b"POST / HTTP/1.1\r\n" + framing + b"\r\n\r\n")
        if rest:
            self.data_received(rest)

    def _internal_error(self, exc: BaseException) -> None:
        """A bug of ours while reading a request: the log gets the traceback, the client a 500, the worker lives."""
        self.w.log.error("unhandled error while reading a request", exc_info=exc)
        self.fail(500, "internal error while reading the request; the server log has the details")

    # httptools callbacks
    def on_message_begin(self) -> None:
        if self.body_only:
            self.req = self.upgraded
            return
        if self.broken:  # bytes after an Upgrade request (and its body): never parsed as requests
            self.req = None
            return
        self.req = Request()
        self.begun = self.in_head = True
        self.line = 0
        self.deadline = time.monotonic() + self.w.http.header_timeout_s

    def on_url(self, url: bytes) -> None:
        req = self.req
        if req is None or self.body_only:
            return
        req.url += url
        if len(req.url) > self.w.limit_line:
            raise HttpError(f"the request URL is over {self.w.limit_line} bytes; send a shorter URL", 414)

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self.req
        if req is None or self.body_only:
            return
        limit = self.w.limit_line
        if len(name) + len(value) + 2 > limit:
            raise HttpError(f"header {name[:64].decode('latin-1')!r} is over {limit} bytes; send shorter headers", 431)
        if len(req.fields) >= self.w.limit_fields:
            raise HttpError(
                f"the request has more than {self.w.limit_fields} header fields (repeats count each); send fewer", 431
            )
        req.fields.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        req = self.req
        self.in_head = False
        self.line = 0
        if req is None or self.body_only:
            return
        parser = self.parser
        req.method = parser.get_method()
        req.version = parser.get_http_version()
        req.keep_alive = parser.should_keep_alive()
        headers = req.headers
        for key, value in req.fields:
            old = headers.get(key)
            headers[key] = value if old is None else old + b", " + value
        if req.version not in SUPPORTED_VERSIONS:
            raise HttpError(f"HTTP/{req.version} is not supported; send an HTTP/1.1 request", 505)
        if req.url[:1] != b"/" and req.url[:4].lower() == b"http":  # absolute-form (RFC 9112 3.2.2): its path
            try:
                u = httptools.parse_url(req.url)
            except httptools.HttpParserInvalidURLError:
                raise HttpError(f"the request target {req.url[:64]!r} is not a URL; send a path", 400) from None
            req.url = (u.path or b"/") + (b"?" + u.query if u.query else b"")
        raw = headers.get(b"content-length")
        if raw is not None:
            try:
                req.length = int(raw)
            except ValueError:
                raise HttpError(f"Content-Length {raw[:32]!r} is not a number", 400) from None
            if req.length > self.w.max_body_bytes:
                raise HttpError(too_large(req.length, self.w.max_body_bytes), 413)
        chunked = b"chunked" in headers.get(b"transfer-encoding", b"").lower()
        if parser.should_upgrade():  # see _upgrade: answered as HTTP/1.1, then closed
            self.must_close = True
            if req.length or chunked:
                self.upgraded = req
        if req.length or chunked:
            self.deadline = time.monotonic() + self.w.http.body_timeout_s
            self.w.batcher.receiving(req)
        if headers.get(b"expect", b"").lower() == b"100-continue" and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # curl waits 1 s for this on big bodies

    def on_body(self, body: bytes) -> None:
        req = self.req
        if req is None:
            return
        req.size += len(body)
        if req.size > self.w.max_body_bytes:
            raise HttpError(too_large(req.length, self.w.max_body_bytes), 413)
        req.body.append(body)
        self.deadline = time.monotonic() + self.w.http.body_timeout_s
        self.w.batcher.receiving(req)

    def on_message_complete(self) -> None:
        req = self.req
        self.req = None
        self.deadline = 0.0
        if req is None:
            return
        if req is self.upgraded:
            if not self.body_only:  # httptools skipped the body; _upgrade reads it
                return
            self.upgraded = None
            self.body_only = False
            self.broken = True  # what follows the upgraded request is not parsed
        self.w.batcher.request_arrived(req)
        self.queue.append(req)
        if len(self.queue) > MAX_PIPELINED:
            self.pipeline_full = True
            self._flow()
        if not self.busy:
            self.next()

    # answering
    def next(self) -> None:
        if self.queue and not self.busy and not self.write_full and self.transport is not None:
            req = self.queue.popleft()
            self.busy = True
            if req.error is not None:
                self._answer_error(req, *req.error)
            else:
                self.w.handle(self, req)
        if self.pipeline_full and len(self.queue) <= MAX_PIPELINED // 2:
            self.pipeline_full = False
            self._flow()

    def respond(self, req: Request, status: str, headers: list[tuple[str, str]] | str, body: bytes) -> bool:
        """Write one answer (headers and body in one write); returns whether the connection stays open."""
        w = self.w
        self.served += 1
        keep = (
            req.keep_alive
            and not w.stopping
            and not (self.must_close and not self.queue and self.upgraded is None)
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
                if self.broken or req.keep_alive:  # the client may still be sending
                    self._linger(transport)
                else:
                    transport.close()
        self.busy = False
        self.idle_since = time.monotonic()
        if keep:
            self.next()
        return keep

    def _linger(self, transport: asyncio.Transport) -> None:
        """Half-close, then discard what the client still sends for up to ``LINGER_S`` (or until it closes).

        Closing a socket with unread bytes makes the kernel send a reset, which can destroy the answer (a 431,
        a 408) before the client has read it.
        """
        try:
            if not transport.can_write_eof():
                raise NotImplementedError
            transport.write_eof()  # after the answer is flushed
        except NotImplementedError:  # a transport without half-close
            transport.close()
            return
        self.broken = self.lingering = True
        self._flow()
        self.w.loop.call_later(LINGER_S, transport.close)

    def fail(self, status: int, message: str) -> None:
        """Answer a request that cannot be read, after the requests before it, then close: the rest of the
        stream cannot be trusted."""
        if self.broken:  # an answer that ends this stream is queued already; what came after it is not read
            return
        req = self.req or Request()
        if self.req is not None:
            self.req = None
            self.w.batcher.request_arrived(req)
        if self.upgraded is not None and self.upgraded is not req:
            self.w.batcher.request_arrived(self.upgraded)
        self.upgraded = None
        self.body_only = self.in_head = False
        self.deadline = 0.0
        req.keep_alive = False
        req.error = (status, message)
        self.broken = True
        self._flow()
        self.queue.append(req)
        self.next()

    def _answer_error(self, req: Request, status: int, message: str) -> None:
        client = req.header(b"x-request-id")
        if client is None:  # the headers ended early (a limit, a timeout): the lines read so far
            client = next((v.decode("latin-1") for k, v in req.fields if k == b"x-request-id"), None)
        rid = request_id(client)
        self.w.inflight += 1
        body = _error_body(message, rid if status >= 500 else None)
        self.w.finish(self, req, rid, "other", Reply(body, status), message, "HttpError")

    def expire(self, now: float) -> None:
        """Called by the worker's tick: a request whose headers or body stopped coming gets a 408 and the
        connection closes (slowloris and stalled uploads hold no connection, no batch and no memory)."""
        if self.deadline and now > self.deadline and self.reading and self.req is not None:
            what = "headers" if self.in_head else "body"
            limit = self.w.http.header_timeout_s if self.in_head else self.w.http.body_timeout_s
            self.fail(408, f"the request {what} did not arrive in time ({limit:g} s); send the whole request at once")

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
