"""Worker lifecycle: the draining flag and the gthread worker that sets it on SIGTERM.

On SIGTERM gunicorn's master closes its listeners and sends SIGTERM to every worker.
``DrainingWorker`` then flips readiness to 503 at once, keeps serving for
``DLSTACK_DRAIN_SECONDS`` (so load balancers see the 503 and stop routing here), then
lets gunicorn's graceful shutdown finish in-flight requests and exit. It also sends small
responses in one write and does not let silent connections hold up a stop.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from gunicorn import util
from gunicorn.http import wsgi
from gunicorn.workers.gthread import _DEFER, DEFAULT_WORKER_DATA_TIMEOUT, ThreadWorker

_DRAINING = threading.Event()
KEEPALIVE_REQUESTS = 1000  # default requests per kept-alive connection before it is closed (0 = no limit)
ACCEPT_DELAY_PER_CONN_S = 0.001  # s a worker waits before accepting, per connection it holds beyond its threads
STOP_POLL_S = 0.1  # s; how often a thread waiting for a new connection's first bytes checks for a stop


def draining() -> bool:
    return _DRAINING.is_set()


def start_draining() -> None:
    _DRAINING.set()


class OneWriteResponse(wsgi.Response):
    """gunicorn's HTTP/1 response, sending the headers and a body given in one piece in one ``sendall``.

    gunicorn sends the headers, then each body chunk: two syscalls (each waking the client) and
    two TCP segments for a small inference answer. Everything else is gunicorn's.
    """

    def write(self, arg: bytes) -> None:
        if (
            not self.headers_sent  # type: ignore[has-type]
            and not self.chunked
            and not self._omits_body
            and type(arg) is bytes
            and arg
            and self.response_length == len(arg)
        ):
            tosend = self._head()
            tosend.extend([f"{k}: {v}\r\n" for k, v in self.headers])
            head = util.to_bytestring("{}\r\n".format("".join(tosend)), "latin-1")
            self.headers_sent = True
            self.sent = len(arg)
            util.write(self.sock, head + arg)
            return
        super().write(arg)

    def _head(self) -> list[str]:
        """``default_headers`` for a response with a length (never chunked), the Date string cached per second."""
        connection = "upgrade" if self.upgrade else "close" if self.should_close() else "keep-alive"
        return [
            f"HTTP/{self.req.version[0]}.{self.req.version[1]} {self.status}\r\n",
            f"Server: {self.version}\r\n",
            f"Date: {_http_date()}\r\n",
            f"Connection: {connection}\r\n",
        ]


_date: tuple[int, str] = (-1, "")


def _http_date() -> str:
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, util.http_date(now))
    return _date[1]


def _one_write(app: Callable[..., Any]) -> Callable[..., Any]:
    """Let HTTP/1 responses of ``app`` use ``OneWriteResponse`` (HTTP/2 responses keep their own class)."""

    def call(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        resp = getattr(start_response, "__self__", None)
        if type(resp) is wsgi.Response:
            resp.__class__ = OneWriteResponse
        return app(environ, start_response)

    return call


class DrainingWorker(ThreadWorker):
    """A gthread worker whose SIGTERM first turns readiness off, then stops after the drain period."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # gunicorn_conf validated DLSTACK_KEEPALIVE_REQUESTS (an int >= 0; 0 = no limit)
        self.keepalive_requests = int(os.environ.get("DLSTACK_KEEPALIVE_REQUESTS") or KEEPALIVE_REQUESTS)
        self._accept_paused_until = 0.0  # monotonic s; set while this worker leaves new connections to others

    def handle(self, conn: Any) -> Any:
        """gunicorn's ``handle``, but a new connection that has sent nothing yet does not hold up a stop.

        gunicorn waits up to 5 s in a pool thread for a new connection's first bytes, and a
        stopping worker waits for that thread: an idle client (a TCP probe, a pooled connection)
        delayed every SIGTERM by 5 s (plus a 2 s close linger). Here the wait is sliced and ends once
        the worker stops; the connection, which carries no request, is shut down and closed.
        """
        if not conn.initialized and not conn.data_ready:
            deadline = time.monotonic() + DEFAULT_WORKER_DATA_TIMEOUT
            while not conn.wait_for_data(min(STOP_POLL_S, max(deadline - time.monotonic(), 0.0))):
                if not self.alive:
                    # gunicorn's close then lingers 2 s for the client's FIN, serially in the main thread;
                    # with nothing received there is nothing to drain.
                    with contextlib.suppress(OSError):
                        conn.sock.shutdown(socket.SHUT_RDWR)
                    return False
                if time.monotonic() >= deadline:
                    return _DEFER
        return super().handle(conn)

    def accept(self, listener: Any) -> None:
        """Let a worker with fewer connections take a new one first (nginx's ``accept_disabled`` idea).

        All workers poll the shared socket and the busiest one, already awake, tends to win every
        race (one worker held 26-32 of wrk's 32 connections in 4 of 8 benchmark rounds): a worker
        with more than ``threads`` connections first stops polling the socket for
        ``ACCEPT_DELAY_PER_CONN_S`` per extra connection, then accepts what no other worker took.
        """
        delay = (self.nr_conns - self.cfg.threads) * ACCEPT_DELAY_PER_CONN_S
        if delay > 0 and self.alive:
            self._accept_paused_until = time.monotonic() + delay
            super().set_accept_enabled(False)
            return
        super().accept(listener)

    def set_accept_enabled(self, enabled: bool) -> None:
        if not enabled:
            self._accept_paused_until = 0.0
        elif self._accept_paused_until:
            if time.monotonic() < self._accept_paused_until:
                return
            self._accept_paused_until = 0.0
            super().set_accept_enabled(True)
            for listener in self.sockets:  # the connection(s) no other worker took meanwhile
                ThreadWorker.accept(self, listener)
            return
        super().set_accept_enabled(enabled)

    def wait_for_and_dispatch_events(self, timeout: float) -> None:
        if self._accept_paused_until:  # wake up in time to accept again
            timeout = min(timeout, max(self._accept_paused_until - time.monotonic(), 0.0))
        super().wait_for_and_dispatch_events(timeout)

    def handle_request(self, req: Any, conn: Any) -> Any:
        """Close a kept-alive connection after ``keepalive_requests`` requests (with ``Connection: close``).

        A client's kept-alive connections stay with the worker that accepted them (see ``accept``);
        reconnecting now and then re-spreads long-lived ones (a load balancer's pool opened while
        one worker was starting) over the workers, like nginx's ``keepalive_requests``.
        """
        if self.keepalive_requests and conn.parser.req_count >= self.keepalive_requests:
            req.must_close = True
        return super().handle_request(req, conn)

    def load_wsgi(self) -> None:
        super().load_wsgi()
        self.wsgi = _one_write(self.wsgi)  # type: ignore[has-type]

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
