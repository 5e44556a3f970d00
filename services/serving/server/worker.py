"""The gunicorn worker: one event loop (uvloop) per process, HTTP/1.1 parsed by httptools.

Why not gthread: on the 2-CPU benchmark about 40 % of a worker's time went to gthread's
per-request path (a pool thread per request, a selector round trip per kept-alive request),
and gunicorn's own ``-k asgi`` worker reached 5,500 JSON / 7,000 binary req/s on the MLP where
an httptools protocol on uvloop reached 8,000 / 10,500 (tests/bench, same run).

The inference routes and the health probes are answered on the loop, through the same
``Views`` code the Flask routes use; their forward passes are batched by ``LoopBatcher`` and
run in one inference thread, so the loop keeps reading requests (and answering probes) while
the model computes. Every other route goes to the Flask app (WSGI) in a pool of ``threads``
threads, and so does inference while the model is still loading (it waits for the load there).

SIGTERM: readiness turns 503 at once; after ``DLSTACK_DRAIN_SECONDS`` the worker stops
accepting, answers the requests it has and the next one on each kept-alive connection with
``Connection: close``, closes connections idle for ``STOP_IDLE_GRACE_S`` and exits, within
gunicorn's ``graceful_timeout``. A ``max_requests`` recycle stops the same way, without the 503.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from gunicorn.workers.base import Worker

from services.serving.server import lifecycle, logs
from services.serving.server.app import (
    _STATUS,
    JSON,
    ModelServer,
    Reply,
    Views,
    check_body,
    error_reply,
    infer_reply,
)
from services.serving.server.batching import LoopBatcher
from services.serving.server.http1 import HttpConnection, Request, _error_body
from services.serving.server.protocol import InferRequest, Tensors

KEEPALIVE_REQUESTS = 1000  # default requests per kept-alive connection before it is closed (0 = no limit)
ACCEPT_FREE_CONNS = 4  # connections a worker accepts without yielding to the other workers
ACCEPT_DELAY_PER_CONN_S = 0.001  # s a worker stops accepting, per connection it holds beyond ACCEPT_FREE_CONNS
TICK_S = 0.1  # s between housekeeping ticks: heartbeat, in-flight gauge, idle connections, stop progress
Headers = list[tuple[str, str]]
WsgiAnswer = tuple[str, Headers, bytes]  # status line, headers, body
# s a kept-alive connection of a stopping worker may stay idle before it is closed. A busy client's next
# request gets its answer with "Connection: close" instead: closing at once raced requests already sent
# (wrk counted 12 errors at each max_requests recycle).
STOP_IDLE_GRACE_S = 0.5


class EventLoopWorker(Worker):
    """gunicorn worker class ``services.serving.server.worker.EventLoopWorker`` (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # gunicorn_conf validated DLSTACK_KEEPALIVE_REQUESTS (an int >= 0; 0 = no limit)
        self.keepalive_requests = int(os.environ.get("DLSTACK_KEEPALIVE_REQUESTS") or KEEPALIVE_REQUESTS)
        self.drain_seconds = float(os.environ.get("DLSTACK_DRAIN_SECONDS") or 0)
        self.conns: set[HttpConnection] = set()
        self.nr_conns = 0  # accepted, including those not yet set up by the loop
        self.stopping = False
        self.stop_deadline = 0.0
        self.accepting = False
        self.accept_paused_until = 0.0
        self.limit_line = self.cfg.limit_request_line or 1 << 20
        self.limit_fields = self.cfg.limit_request_fields or 1 << 10
        self.limit_field_size = self.cfg.limit_request_field_size or 1 << 20
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
        self.views = Views(self.server)
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
        n, v = s.name, s.version
        self.routes: dict[tuple[bytes, bytes], tuple[str, Callable[[HttpConnection, Request, str], None]]] = {
            (b"POST", f"/v2/models/{n}/infer".encode()): ("infer", self._infer),
            (b"POST", f"/v2/models/{n}/versions/{v}/infer".encode()): ("infer", self._infer),
            (b"POST", f"/v1/models/{n}:predict".encode()): ("v1_predict", self._infer),
            (b"GET", b"/v2/health/live"): ("live", self._live),
            (b"GET", b"/v2/health/ready"): ("ready", self._ready),
        }
        self.inflight = 0
        self._inflight_reported = -1

    def run(self) -> None:
        asyncio.set_event_loop(self.loop)
        for listener in self.sockets:
            listener.sock.setblocking(False)
        self._set_accepting(True)
        self.loop.call_later(TICK_S, self._tick)
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
        a worker holding more than ``ACCEPT_FREE_CONNS`` stops polling for 1 ms per extra one.
        """
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
        extra = self.nr_conns - ACCEPT_FREE_CONNS
        if self.nr_conns >= self.cfg.worker_connections:
            self._pause_accepting(0.05)
        elif extra > 0:
            self._pause_accepting(extra * ACCEPT_DELAY_PER_CONN_S)

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
        if self.nr_conns >= self.cfg.worker_connections:
            self._pause_accepting(0.05)
            return
        self._set_accepting(True)

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
            keepalive = self.cfg.keepalive
            for c in [c for c in self.conns if c.idle and now - c.idle_since > keepalive]:
                if c.transport is not None:
                    c.transport.close()
        else:
            for c in [c for c in self.conns if c.idle and now - c.idle_since > STOP_IDLE_GRACE_S]:
                if c.transport is not None:
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

    # requests
    def handle(self, conn: HttpConnection, req: Request) -> None:
        path = req.url.partition(b"?")[0]
        route = self.routes.get((req.method, path))
        if route is None:
            self._wsgi(conn, req)
            return
        rid = req.header(b"x-request-id")
        if not rid or len(rid) > 200:
            rid = os.urandom(16).hex()
        self.inflight += 1
        try:
            route[1](conn, req, rid)
        except Exception as exc:  # a bug of ours, before any answer was written: logged, 500 with the id
            env: dict[str, Any] = {"dlstack.request_id": rid}
            self._reply(conn, req, rid, route[0], error_reply(exc, env), env)

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
        """Count, log and answer one request of a loop route (the WSGI routes count and log in ``AccessLog``).

        Metrics and the access line come first: a client that scrapes ``/metrics`` right after its
        last answer must find that answer counted.
        """
        self.inflight -= 1
        if self.inflight == 0:  # idle is exact; busy is sampled
            self._report_inflight()
        elapsed = time.perf_counter_ns() - req.t0
        m = self.server.metrics
        m.request(route, reply.status, elapsed / 1e9)
        logs.access(
            model=m.model,
            version=m.version,
            request_id=rid,
            method=req.method.decode("latin-1"),
            path=req.url.partition(b"?")[0].decode("latin-1"),
            status=reply.status,
            duration_ns=elapsed,
            error=error,
            error_type=error_type,
        )
        head = f"Content-Type: {reply.content_type}\r\nContent-Length: {len(reply.body)}\r\nX-Request-ID: {rid}\r\n"
        if reply.headers:
            head += "".join(f"{k}: {v}\r\n" for k, v in reply.headers)
        self._count()
        conn.respond(req, _STATUS[reply.status], head, reply.body)

    def _count(self) -> None:
        self.nr += 1
        if self.nr >= self.max_requests and not self.stopping:
            self.log.info("Autorestarting worker after current request.")
            self.begin_stop("max_requests")

    def _reply(
        self, conn: HttpConnection, req: Request, rid: str, route: str, reply: Reply, env: dict[str, Any]
    ) -> None:
        err = env.get("dlstack.error")
        self.finish(conn, req, rid, route, reply, err[0] if err else None, err[1] if err else None)

    def _live(self, conn: HttpConnection, req: Request, rid: str) -> None:
        self.finish(conn, req, rid, "live", self.views.live())

    def _ready(self, conn: HttpConnection, req: Request, rid: str) -> None:
        self.finish(conn, req, rid, "ready", self.views.ready())

    def _infer(self, conn: HttpConnection, req: Request, rid: str) -> None:
        s = self.server
        v1 = req.url.startswith(b"/v1/")
        route = "v1_predict" if v1 else "infer"
        if not s.loaded.is_set():  # the WSGI view waits for the load in a pool thread
            self.inflight -= 1
            self._wsgi(conn, req)
            return
        env: dict[str, Any] = {"dlstack.request_id": rid}
        request: InferRequest | None = None
        try:
            sig = s.require_ready()
            body = check_body(req.header(b"content-type") or "", b"".join(req.body), s.max_body_bytes)
            if v1:
                inputs = sig.decode_v1(body)
            else:
                request = sig.decode(body, req.header(b"inference-header-content-length"))
                inputs = request.inputs
        except Exception as exc:
            self._reply(conn, req, rid, route, error_reply(exc, env), env)
            return

        def done(outputs: Tensors | None, error: BaseException | None) -> None:
            try:
                if error is not None:
                    raise error
                assert outputs is not None
                reply = infer_reply(sig, request, outputs) if request is not None else Reply(sig.encode_v1(outputs))
            except Exception as exc:
                reply = error_reply(exc, env)
            self._reply(conn, req, rid, route, reply, env)

        self.batcher.submit(inputs, done)

    def _run_forward(self, work: Callable[[], None], then: Callable[[], None]) -> None:
        loop = self.loop
        fut = self.infer_thread.submit(work)
        fut.add_done_callback(lambda _: loop.call_soon_threadsafe(then))

    # everything else: the Flask app, in the HTTP thread pool
    def _wsgi(self, conn: HttpConnection, req: Request) -> None:
        environ = self._environ(conn, req)
        environ["dlstack.worker"] = self
        self.inflight += 1
        self._report_inflight()  # now, not at the next tick: a /metrics scrape counts itself
        fut = self.http_pool.submit(self._call_app, environ)
        loop = self.loop
        fut.add_done_callback(lambda f: loop.call_soon_threadsafe(self._wsgi_done, conn, req, f))

    def _wsgi_done(
        self, conn: HttpConnection, req: Request, fut: Future[tuple[str, list[tuple[str, str]], bytes]]
    ) -> None:
        try:
            status, headers, body = fut.result()
        except Exception as exc:  # AccessLog answers every error itself: this is a bug in the bridge
            self.log.exception("WSGI app failed: %s", exc)
            status, headers, body = _STATUS[500], [("Content-Type", JSON)], _error_body("internal error")
        out = [(k, v) for k, v in headers if k.lower() not in _HOP_BY_HOP]
        if not any(k.lower() == "content-length" for k, _ in out):
            out.append(("Content-Length", str(len(body))))
        self.inflight -= 1
        if self.inflight == 0:
            self._report_inflight()
        self._count()
        conn.respond(req, status, out, body)

    def _call_app(self, environ: dict[str, Any]) -> WsgiAnswer:
        state: list[Any] = []

        def start_response(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Callable[[bytes], None]:
            if exc_info and state:
                raise exc_info[1].with_traceback(exc_info[2])
            state[:] = [status, headers]
            return chunks.append

        chunks: list[bytes] = []
        result = self.wsgi(environ, start_response)
        try:
            chunks.extend(result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        return state[0], state[1], b"".join(chunks)

    def _environ(self, conn: HttpConnection, req: Request) -> dict[str, Any]:
        path, _, query = req.url.partition(b"?")
        from urllib.parse import unquote_to_bytes

        environ: dict[str, Any] = {
            "REQUEST_METHOD": req.method.decode("latin-1"),
            "SCRIPT_NAME": "",
            "PATH_INFO": unquote_to_bytes(path).decode("latin-1"),
            "QUERY_STRING": query.decode("latin-1"),
            "SERVER_PROTOCOL": f"HTTP/{req.version}",
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(b"".join(req.body)),
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": self.cfg.workers > 1,
            "wsgi.run_once": False,
            "RAW_URI": req.url.decode("latin-1"),
        }
        sockname = conn.transport.get_extra_info("sockname") if conn.transport else None
        peer = conn.transport.get_extra_info("peername") if conn.transport else None
        if isinstance(sockname, tuple):
            environ["SERVER_NAME"], environ["SERVER_PORT"] = str(sockname[0]), str(sockname[1])
        else:
            environ["SERVER_NAME"], environ["SERVER_PORT"] = "localhost", "80"
        if isinstance(peer, tuple):
            environ["REMOTE_ADDR"], environ["REMOTE_PORT"] = str(peer[0]), str(peer[1])
        for name, value in req.headers.items():
            key = name.decode("latin-1").upper().replace("-", "_")
            if key == "CONTENT_TYPE" or key == "CONTENT_LENGTH":
                environ[key] = value.decode("latin-1")
            else:
                environ["HTTP_" + key] = value.decode("latin-1")
        if "CONTENT_LENGTH" not in environ and req.body:
            environ["CONTENT_LENGTH"] = str(req.size)
        return environ


_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "date", "server"}


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is pinned; plain asyncio works, only slower
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
