"""An ASGI 3 front end over the same route table and inference path, for any ASGI server.

It exists so the benchmark can compare our event-loop worker with uvicorn's gunicorn worker on the
same routes, checks, batching and answers::

    gunicorn -c python:services.serving.server.gunicorn_conf -k uvicorn_worker.UvicornWorker \\
        'services.serving.server.asgi:create_app()'

No framework: each request is matched in ``routes``, inference goes through ``inference.infer_async``
with a ``LoopBatcher`` on the running loop (forward passes in one inference thread), routes that may
block (and every request while the model loads) run in the loop's default executor. The model loads
in a background thread; readiness is 503 until it is loaded. Draining on SIGTERM is the ASGI
server's business: uvicorn stops accepting and finishes what it has.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from services.serving.errors import PayloadTooLarge
from services.serving.server import logs
from services.serving.server.app import ModelServer, start_server
from services.serving.server.batching import LoopBatcher
from services.serving.server.inference import answer, infer_async, notify, record, too_large
from services.serving.server.routes import Call, RawHeaders, Reply, error_reply, request_id
from services.serving.server.settings import ServerSettings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class AsgiApp:
    """The ASGI 3 application: ``await app(scope, receive, send)``; ``server`` is its ``ModelServer``."""

    def __init__(self, server: ModelServer) -> None:
        self.server = server
        self.infer_thread = ThreadPoolExecutor(1, thread_name_prefix="dlstack-infer")
        self._batcher: LoopBatcher | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        # any other scope (websocket) has no route here; returning unanswered makes the server refuse it

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.infer_thread.shutdown(wait=True)
                logs.flush()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _loop_batcher(self) -> LoopBatcher:
        """Built on first use, on the loop the server runs (it does not exist when ``create_app`` runs)."""
        if self._batcher is None:
            loop = asyncio.get_running_loop()
            s = self.server

            def run_forward(work: Callable[[], None], then: Callable[[], None]) -> None:
                loop.run_in_executor(self.infer_thread, work).add_done_callback(lambda _: then())

            self._batcher = LoopBatcher(
                s.forward,
                s.batcher.max_batch_size,
                s.batcher.max_batch_time * 1000.0,
                loop.call_soon,
                loop.call_later,
                run_forward,
            )
        return self._batcher

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        t0 = time.perf_counter_ns()
        s = self.server
        raw: dict[bytes, bytes] = {}
        for name, value in scope["headers"]:  # lower-case names (ASGI); repeats joined as HTTP/1.1 allows
            old = raw.get(name)
            raw[name] = value if old is None else old + b", " + value
        headers = RawHeaders(raw)
        method: str = scope["method"]
        call = Call(method, scope["path"], headers, b"", request_id(headers.get("x-request-id")), t0)
        s.metrics.inflight.inc()
        try:
            try:
                call.body = await _read_body(receive, raw, s.max_body_bytes)
                route, call.params = s.router.match(method, call.path)
                call.route = route.name
                if not route.inline or not s.loaded.is_set():
                    reply = await asyncio.get_running_loop().run_in_executor(None, answer, s, route, call)
                elif route.handler is None:
                    done: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
                    infer_async(s, route, call, self._loop_batcher(), done.set_result)
                    reply = await done
                else:
                    reply = route.handler(s, call)
            except Exception as exc:
                reply = error_reply(exc, call)
        finally:
            s.metrics.inflight.dec()
        record(s, call, reply.status)
        out = [
            (b"content-type", reply.content_type.encode("latin-1")),
            (b"content-length", str(len(reply.body)).encode()),
            (b"x-request-id", call.request_id.encode("latin-1")),
        ]
        out += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers]
        await send({"type": "http.response.start", "status": reply.status, "headers": out})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else reply.body})
        notify(s, call, reply.status)


async def _read_body(receive: Receive, headers: dict[bytes, bytes], limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to be over ``limit``."""
    length = headers.get(b"content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(too_large(int(length), limit))
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client went away
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(too_large(int(length) if length and length.isdigit() else None, limit))
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def create_app(config: ServerSettings | None = None, *, background_load: bool = True) -> AsgiApp:
    """ASGI app factory (``services.serving.server.asgi:create_app()``), called in each worker after fork."""
    return AsgiApp(start_server(config, background_load=background_load))
