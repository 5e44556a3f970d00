"""The gunicorn worker: one event loop (uvloop) per process, HTTP/1.1 parsed by httptools.

Why not gthread: on the 2-CPU benchmark about 40 % of a worker's time went to gthread's
per-request path (a pool thread per request, a selector round trip per kept-alive request),
and gunicorn's own ``-k asgi`` worker reached 5,500 JSON / 7,000 binary req/s on the MLP where
an httptools protocol on uvloop reached 8,000 / 10,500 (tests/bench, same run).

Every request is matched in the route table (``routes``) and answered on the loop: inference
through the one inference path (``inference.infer_async``: its forward passes are batched by
``LoopBatcher`` and run in one inference thread, so the loop keeps reading requests and answering
probes while the model computes), the other routes by their handlers. Routes that may block
(``/metrics`` reads every worker's files) and any request that arrives while the model is still
loading (it waits for the load) are answered in a pool of ``threads`` threads. The Flask app that
gunicorn loads only hands the worker its ``ModelServer``.

SIGTERM: readiness turns 503 at once; after ``DLSTACK_DRAIN_SECONDS`` the worker stops
accepting, answers the requests it has and the next one on each kept-alive connection with
``Connection: close``, closes connections idle for ``STOP_IDLE_GRACE_S`` and exits, within
gunicorn's ``graceful_timeout``. A ``max_requests`` recycle stops the same way, without the 503.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any
from urllib.parse import unquote_to_bytes

from gunicorn.workers.base import Worker

from services.serving.server import lifecycle, logs
from services.serving.server.app import ModelServer
from services.serving.server.batching import LoopBatcher
from services.serving.server.http1 import HttpConnection, Request
from services.serving.server.inference import answer, infer_async, notify, record
from services.serving.server.routes import STATUS, Call, RawHeaders, Reply, Route, error_reply, request_id

ACCEPT_FREE_CONNS = 4  # connections a worker accepts without yielding to the other workers
ACCEPT_DELAY_PER_CONN_S = 0.001  # s a worker stops accepting, per recently active connection beyond ACCEPT_FREE_CONNS
IDLE_CONN_S = 1.0  # s without a request after which a held connection no longer slows this worker's accepts
# s a new connection may take to complete its first request and still count as load: a client that has
# not sent one whole request by then (a stalled or slow one) must not slow the accepts of real clients.
FIRST_REQUEST_S = 0.25
# s: the longest accept pause. Enough for an awake worker to win the next race; a burst of 200 connects once
# paused a worker for 100 ms per accept.
ACCEPT_MAX_DELAY_S = 0.005
TICK_S = 0.1  # s between housekeeping ticks: heartbeat, in-flight gauge, idle connections, stop progress
# s a kept-alive connection of a stopping worker may stay idle before it is closed. A busy client's next
# request gets its answer with "Connection: close" instead: closing at once raced requests already sent
# (wrk counted 12 errors at each max_requests recycle).
STOP_IDLE_GRACE_S = 0.5
# s of CPU: forward passes cheaper than this (on average) run on the event loop, others in the inference thread.
# Short enough that a probe or a new request waits no longer than a GC pause would make it.
INLINE_FORWARD_MAX_S = 0.002
FORWARD_EWMA = 0.2  # weight of the newest pass in forward_s


class EventLoopWorker(Worker):
    """gunicorn worker class ``services.serving.server.worker.EventLoopWorker`` (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conns: set[HttpConnection] = set()
        self.nr_conns = 0  # accepted, including those not yet set up by the loop
        self.stopping = False
        self.stop_deadline = 0.0
        self.accepting = False
        self.accept_paused_until = 0.0
        self.idle_conns = 0  # connections idle over IDLE_CONN_S, or stalled before a first request, at the last tick
        self.loop: asyncio.AbstractEventLoop = _new_loop()  # made current in run(), in the worker process only

    # gunicorn hooks
    def init_signals(self) -> None:
        for s in self.SIGNALS:
            signal.signal(s, signal.SIG_DFL)
        self.loop.add_signal_handler(signal.SIGTERM, self.handle_term)
        self.loop.add_signal_handler(signal.SIGQUIT, self.handle_quick)
        self.loop.add_signal_handler(signal.SIGINT, self.handle_quick)
        signal.signal(signal.SIGUSR1, self.handle_usr1)
        signal.signal(signal.SIGABRT, self.handle_abort)
        signal.signal(signal.SIGWINCH, self.handle_winch)
        signal.siginterrupt(signal.SIGUSR1, False)

    def load_wsgi(self) -> None:
        super().load_wsgi()
        app: Any = self.wsgi
        self.server: ModelServer = app.extensions["dlstack"]
        # ServerSettings, validated once by gunicorn_conf in the master
        self.keepalive_requests = self.server.config.keepalive_requests  # 0 = no limit
        self.drain_seconds = self.server.config.drain_seconds
        self.http = self.server.config  # the HTTP hardening limits, read by http1.HttpConnection
        self.limit_line = self.http.max_header_line_bytes  # request line and each header line
        self.limit_fields = self.http.max_header_count
        self.max_body_bytes = self.server.max_body_bytes
        self.infer_thread = ThreadPoolExecutor(1, thread_name_prefix="dlstack-infer")
        self.http_pool = ThreadPoolExecutor(max(1, self.cfg.threads), thread_name_prefix="dlstack-http")
        s = self.server
        self.batcher = LoopBatcher(
            s.forward,
            s.batcher.max_batch_size,
            s.batcher.max_batch_time * 1000.0,
            self.loop.call_soon,
            self.loop.call_later,
            self._run_forward,
        )
        # The served model's own paths, by raw request-line bytes: one dict lookup on the hot path.
        self.exact = s.router.exact_raw
        self.inflight = 0
        self._inflight_reported = -1
        self.forward_s = float("inf")  # moving average of a forward pass's CPU seconds; unknown at first

    def run(self) -> None:
        asyncio.set_event_loop(self.loop)
        for listener in self.sockets:
            listener.sock.setblocking(False)
        self._set_accepting(True)
        self.loop.call_later(TICK_S, self._tick)
        logs.flush_on(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.infer_thread.shutdown(wait=True)
            self.http_pool.shutdown(wait=True)
            self.server.metrics.inflight.set(0)
            logs.flush()

    # signals
    def handle_term(self) -> None:
        if lifecycle.draining():
            return
        lifecycle.start_draining()
        self.log.info("SIGTERM: readiness is now 503; draining")
        self.loop.call_later(max(self.drain_seconds, 0.0), self.begin_stop, "SIGTERM")

    def handle_quick(self) -> None:
        self.alive = False
        self.cfg.worker_int(self)
        self.loop.stop()

    # accepting connections
    def _set_accepting(self, on: bool) -> None:
        if on == self.accepting:
            return
        self.accepting = on
        for listener in self.sockets:
            if on:
                self.loop.add_reader(listener.sock.fileno(), self._accept, listener.sock)
            else:
                self.loop.remove_reader(listener.sock.fileno())

    def _accept(self, sock: socket.socket) -> None:
        """Accept one connection, then let a worker with fewer connections take the next ones first.

        All workers poll the shared socket and the one already awake tends to win every race
        (with gthread, one worker held 26-32 of wrk's 32 connections in 4 of 8 benchmark rounds):
        a worker holding more than ``ACCEPT_FREE_CONNS`` stops polling for 1 ms per extra one, at most
        ``ACCEPT_MAX_DELAY_S``. Connections idle for over ``IDLE_CONN_S`` do not count: 200 idle keep-alive
        connections once cut accepts to 21/s.
        Over ``max_connections`` the connection idle the longest is closed to make room; when every one
        has a request in progress, new ones wait in the backlog (or for another worker).
        """
        if self.nr_conns >= self.http.max_connections and not self._evict_idle():
            self._pause_accepting(0.05)
            return
        try:
            conn, _ = sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # EMFILE and co: say so, back off, keep serving what we have
            self.log.error("accept failed: %s", exc)
            self._pause_accepting(0.5)
            return
        conn.setblocking(False)
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.nr_conns += 1
        task = self.loop.create_task(self.loop.connect_accepted_socket(lambda: HttpConnection(self), conn))
        task.add_done_callback(self._connected)
        extra = self.nr_conns - self.idle_conns - ACCEPT_FREE_CONNS
        if extra > 0:
            self._pause_accepting(min(extra * ACCEPT_DELAY_PER_CONN_S, ACCEPT_MAX_DELAY_S))

    def _evict_idle(self) -> bool:
        """Close the connection idle the longest (never one with a request in progress); False if none is idle."""
        idle = [c for c in self.conns if c.idle and c.transport is not None and not c.transport.is_closing()]
        if not idle:
            return False
        victim = min(idle, key=lambda c: c.idle_since)
        if victim.transport is not None:
            victim.transport.close()
        return True

    def _connected(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled() or task.exception() is not None:  # gone before set-up: never counted down
            self.nr_conns -= 1

    def _pause_accepting(self, seconds: float) -> None:
        self._set_accepting(False)
        self.accept_paused_until = time.monotonic() + seconds
        self.loop.call_later(seconds, self._resume_accepting)

    def _resume_accepting(self) -> None:
        if self.stopping or self.accepting:
            return
        left = self.accept_paused_until - time.monotonic()
        if left > 0:  # the loop's timer clock may run a little ahead of time.monotonic()
            self.loop.call_later(left, self._resume_accepting)
            return
        self._set_accepting(True)  # _accept checks max_connections before it accepts

    # housekeeping
    def _tick(self) -> None:
        self.notify()
        self._report_inflight()
        now = time.monotonic()
        if not self.stopping:
            if self.ppid != os.getppid():
                self.log.info("Parent changed, shutting down: %s", self)
                self.begin_stop("parent changed")
            elif not self.alive:  # gunicorn's reloader or a handler said stop
                self.begin_stop("stop requested")
            keepalive = self.http.idle_timeout_s
            idle = 0
            for c in list(self.conns):
                if not c.idle:
                    c.expire(now)  # 408 and close a request whose headers or body stopped coming
                    if c.served == 0 and not c.busy and now - c.idle_since > FIRST_REQUEST_S:
                        idle += 1
                elif now - c.idle_since > keepalive:
                    if c.transport is not None:
                        c.transport.close()
                elif now - c.idle_since > IDLE_CONN_S:
                    idle += 1
            self.idle_conns = idle
        else:
            for c in list(self.conns):
                if not c.idle:
                    c.expire(now)
                elif now - c.idle_since > STOP_IDLE_GRACE_S and c.transport is not None:
                    c.transport.close()
            if (not self.conns and self.inflight == 0) or now >= self.stop_deadline:
                if self.conns:
                    self.log.warning(
                        "graceful timeout: closing %d connection(s) with requests in progress", len(self.conns)
                    )
                self.loop.stop()
                return
        self.loop.call_later(TICK_S, self._tick)

    def _report_inflight(self) -> None:
        """The in-flight gauge is written each tick, when a Flask route starts and when the worker turns idle,
        not twice per request."""
        if self.inflight != self._inflight_reported:
            self._inflight_reported = self.inflight
            self.server.metrics.inflight.set(self.inflight)

    def begin_stop(self, why: str) -> None:
        """Stop accepting; ``_tick`` closes idle connections and ends the loop when the last one is gone."""
        if self.stopping:
            return
        self.stopping = True
        self.alive = False
        self.stop_deadline = time.monotonic() + self.cfg.graceful_timeout
        self._set_accepting(False)
        self.log.info(
            "worker stopping (%s): %d connection(s) open, %d request(s) in flight", why, len(self.conns), self.inflight
        )

    # requests: every one through the route table
    def handle(self, conn: HttpConnection, req: Request) -> None:
        raw_path = req.url.partition(b"?")[0]
        path = raw_path.decode("latin-1")
        if "%" in path:
            path = unquote_to_bytes(raw_path).decode("latin-1")
        call = Call(
            req.method.decode("latin-1"),
            path,
            RawHeaders(req.headers),
            b"".join(req.body),
            request_id(req.header(b"x-request-id")),
            req.t0,
        )
        self.inflight += 1
        s = self.server
        try:
            hit = self.exact.get((req.method, raw_path))
            route, call.params = hit if hit is not None else s.router.match(call.method, path)
            call.route = route.name
            if not route.inline or not s.loaded.is_set():
                self._offload(conn, req, route, call)
                return
            if route.handler is None:
                infer_async(s, route, call, self.batcher, lambda reply: self._finish(conn, req, call, reply))
                return
            reply = route.handler(s, call)
        except Exception as exc:  # no such route, or a bug of ours before any answer was written
            reply = error_reply(exc, call)
        self._finish(conn, req, call, reply)

    def finish(
        self,
        conn: HttpConnection,
        req: Request,
        rid: str,
        route: str,
        reply: Reply,
        error: str | None = None,
        error_type: str | None = None,
    ) -> None:
        """Answer a request that the connection rejected before routing (bad framing, limits)."""
        call = Call(
            req.method.decode("latin-1"),
            req.url.partition(b"?")[0].decode("latin-1"),
            RawHeaders(req.headers),
            b"",
            rid,
            req.t0,
        )
        call.route, call.error, call.error_type = route, error, error_type
        self._finish(conn, req, call, reply)

    def _finish(self, conn: HttpConnection, req: Request, call: Call, reply: Reply) -> None:
        """Count, log and answer one request, then tell the observers.

        Metrics and the access line come first: a client that scrapes ``/metrics`` right after its
        last answer must find that answer counted.
        """
        self.inflight -= 1
        if self.inflight == 0:  # idle is exact; busy is sampled
            self._report_inflight()
        s = self.server
        record(s, call, reply.status)
        head = (
            f"Content-Type: {reply.content_type}\r\nContent-Length: {len(reply.body)}\r\n"
            f"X-Request-ID: {call.request_id}\r\n"
        )
        if reply.headers:
            head += "".join(f"{k}: {v}\r\n" for k, v in reply.headers)
        self._count()
        conn.respond(req, STATUS[reply.status], head, reply.body)
        if s.observers:
            notify(s, call, reply.status)

    def _count(self) -> None:
        self.nr += 1
        if self.nr >= self.max_requests and not self.stopping:
            self.log.info("Autorestarting worker after current request.")
            self.begin_stop("max_requests")

    def _run_forward(self, work: Callable[[], None], then: Callable[[], None]) -> None:
        """Run a batch's forward pass on the loop itself when passes are short, else in the inference thread.

        A thread hop (submit, wake the thread, a future callback, ``call_soon_threadsafe``, wake the loop)
        cost more CPU than a small model's whole forward pass; on the loop, the requests that arrive
        during a pass still wait in the socket buffers and make up the next batch. A pass that takes
        more than ``INLINE_FORWARD_MAX_S`` of CPU (averaged) would delay probes and reads, so it goes to
        the thread; the first passes go there too, until their cost is known. CPU time, not wall time:
        on a busy machine a preempted pass would look long and send a small model back to the thread.
        """
        if self.forward_s <= INLINE_FORWARD_MAX_S:
            t0 = time.thread_time()
            work()
            self._forward_took(time.thread_time() - t0)
            then()
            return
        loop = self.loop

        def timed() -> None:
            t0 = time.thread_time()
            work()
            loop.call_soon_threadsafe(self._forward_done, time.thread_time() - t0, then)

        self.infer_thread.submit(timed)

    def _forward_done(self, seconds: float, then: Callable[[], None]) -> None:
        self._forward_took(seconds)
        then()

    def _forward_took(self, seconds: float) -> None:
        f = self.forward_s
        self.forward_s = seconds if f == float("inf") else f + FORWARD_EWMA * (seconds - f)

    def _offload(self, conn: HttpConnection, req: Request, route: Route, call: Call) -> None:
        """A route that may block (or any route while the model loads): answered in the HTTP thread pool."""
        self._report_inflight()  # now, not at the next tick: a /metrics scrape counts itself
        fut = self.http_pool.submit(answer, self.server, route, call)
        loop = self.loop
        fut.add_done_callback(lambda f: loop.call_soon_threadsafe(self._offloaded, conn, req, call, f))

    def _offloaded(self, conn: HttpConnection, req: Request, call: Call, fut: Future[Reply]) -> None:
        try:
            reply = fut.result()
        except Exception as exc:  # answer() turns every error into a reply: this is a bug in the bridge
            reply = error_reply(exc, call)
        self._finish(conn, req, call, reply)


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is pinned; plain asyncio works, only slower
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
