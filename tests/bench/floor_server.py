"""The transport floor: a no-model V2 infer endpoint, as fast as plain Python serves it.

It does what any model server must do before a model runs, and nothing else: HTTP/1.1
keep-alive, the JSON body decoded to a float32 array of the declared shape (orjson, then
``np.asarray(...).reshape``), or a binary-tensor body cut with ``np.frombuffer``, and one fixed
answer. dlstack's req/s over the floor's, in the same run, is how much of the machine the
server's own work (model, batching, metrics, logs) costs. Two implementations::

    python -m tests.bench.floor_server --impl protocol --port P --workers 2 --shape -1,784
    python -m tests.bench.floor_server --impl uvicorn  --port P --workers 2 --shape -1,784

``protocol`` is an httptools parser on a uvloop loop, one process per worker forked after the
listening socket is bound (like gunicorn); ``uvicorn`` is uvicorn (httptools + uvloop) over a
minimal ASGI app. The benchmark uses the faster one on this machine (``FLOOR_IMPL``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import numpy as np
import orjson

# Measured once each on the 2-CPU machine (MLP JSON body, wrk c=32, 2 workers): the protocol beat uvicorn
# (see README "Model server"), so the floor is the faster of the two.
FLOOR_IMPL = "protocol"
IMPLS = ("protocol", "uvicorn")

_OUTPUT_ROW = [0.0] * 10
_JSON_ANSWER = orjson.dumps(
    {"model_name": "floor", "outputs": [{"name": "output", "datatype": "FP32", "shape": [1, 10], "data": _OUTPUT_ROW}]}
)
_BIN_HEADER = orjson.dumps(
    {
        "model_name": "floor",
        "outputs": [{"name": "output", "datatype": "FP32", "shape": [1, 10], "parameters": {"binary_data_size": 40}}],
    }
)
_BIN_ANSWER = _BIN_HEADER + np.zeros(10, dtype=np.float32).tobytes()


class BadRequest(ValueError):
    """The body is not a one-input FP32 request of the declared shape."""


def decode(body: bytes, header_length: bytes | None, shape: tuple[int, ...]) -> tuple[np.ndarray, bool]:
    """The request's input tensor and whether it came as binary; the same checks a real server needs."""
    if header_length is not None:
        n = int(header_length)
        head = orjson.loads(body[:n])
        inp = head["inputs"][0]
        x = np.frombuffer(body, dtype=np.float32, offset=n).reshape(inp["shape"])
        binary = True
    else:
        inp = orjson.loads(body)["inputs"][0]
        x = np.asarray(inp["data"], dtype=np.float32).reshape(inp["shape"])
        binary = False
    if x.ndim != len(shape) or any(d not in (-1, s) for d, s in zip(shape, x.shape, strict=True)):
        raise BadRequest(f"input shape {list(x.shape)} does not match the declared {list(shape)}")
    return x, binary


def answer(body: bytes, header_length: bytes | None, shape: tuple[int, ...]) -> tuple[int, bytes, list[bytes]]:
    """(status, body, extra header lines) for one infer request."""
    try:
        _, binary = decode(body, header_length, shape)
    except (BadRequest, ValueError, KeyError, IndexError, TypeError) as exc:
        return 400, orjson.dumps({"error": str(exc)}), []
    if binary:
        return 200, _BIN_ANSWER, [b"Inference-Header-Content-Length: %d\r\n" % len(_BIN_HEADER)]
    return 200, _JSON_ANSWER, []


_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found"}


class FloorProtocol(asyncio.Protocol):
    """One keep-alive connection: httptools parses, each complete request is answered at once."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        import httptools

        self.shape = shape
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []
        self.header_length: bytes | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        import httptools

        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._write(400, b"bad request", [], close=True)

    def on_message_begin(self) -> None:
        self.url, self.body, self.header_length = b"", [], None

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"inference-header-content-length":
            self.header_length = value

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.url.endswith(b"/infer"):
            status, out, extra = answer(b"".join(self.body), self.header_length, self.shape)
        elif self.url in (b"/v2/health/ready", b"/v2/health/live"):
            status, out, extra = 200, b"", []
        else:
            status, out, extra = 404, b"not found", []
        self._write(status, out, extra, close=not self.parser.should_keep_alive())

    def _write(self, status: int, body: bytes, extra: list[bytes], close: bool) -> None:
        assert self.transport is not None
        head = b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s%s\r\n" % (
            status,
            _REASONS[status],
            len(body),
            b"".join(extra),
            b"Connection: close\r\n" if close else b"",
        )
        self.transport.write(head + body)
        if close:
            self.transport.close()


def _serve_protocol(sock: socket.socket, shape: tuple[int, ...]) -> None:
    import uvloop

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: FloorProtocol(shape), sock=sock, backlog=2048)
        stop = loop.create_future()
        loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
        await stop
        server.close()

    uvloop.run(main())


def run_protocol(port: int, workers: int, shape: tuple[int, ...]) -> None:
    """Bind once, fork ``workers`` processes that all accept on the socket; SIGTERM stops them all."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(2048)
    sock.setblocking(False)
    children = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:
            try:
                _serve_protocol(sock, shape)
            finally:
                os._exit(0)
        children.append(pid)

    def stop(*_: object) -> None:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for pid in children:
        os.waitpid(pid, 0)


Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def make_asgi(shape: tuple[int, ...]) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        chunks = []
        while True:
            msg = await receive()
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body"):
                break
        path = scope["path"]
        headers = [(b"content-type", b"application/json")]
        if path.endswith("/infer"):
            hl = next((v for k, v in scope["headers"] if k == b"inference-header-content-length"), None)
            status, out, extra = answer(b"".join(chunks), hl, shape)
            if extra:
                headers.append((b"inference-header-content-length", b"%d" % len(_BIN_HEADER)))
        elif path in ("/v2/health/ready", "/v2/health/live"):
            status, out = 200, b""
        else:
            status, out = 404, b"not found"
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": out})

    return app


def asgi_app() -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """uvicorn's ``--factory`` entry point; the declared shape comes from FLOOR_SHAPE."""
    return make_asgi(parse_shape(os.environ.get("FLOOR_SHAPE", "-1,784")))


def run_uvicorn(port: int, workers: int, shape: tuple[int, ...]) -> None:
    import uvicorn

    os.environ["FLOOR_SHAPE"] = ",".join(map(str, shape))
    uvicorn.run(
        "tests.bench.floor_server:asgi_app",
        factory=True,
        host="127.0.0.1",
        port=port,
        workers=workers,
        loop="uvloop",
        http="httptools",
        lifespan="off",
        access_log=False,
        log_level="warning",
        backlog=2048,
    )


def parse_shape(raw: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in raw.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape {raw!r} is not comma-separated integers, e.g. -1,784") from None
    if not shape or any(d == 0 or d < -1 for d in shape):
        raise argparse.ArgumentTypeError(f"--shape {raw!r}: each dimension must be positive or -1 (any)")
    return shape


def cmd(impl: str, port: int, shape: tuple[int, ...], workers: int = 2) -> list[str]:
    """The command line that serves the floor for a model input of ``shape``."""
    return [sys.executable, "-m", "tests.bench.floor_server", "--impl", impl, "--port", str(port),
            "--workers", str(workers), f"--shape={','.join(map(str, shape))}"]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench.floor_server", description=__doc__.split("\n\n")[0])
    p.add_argument("--impl", choices=IMPLS, default=FLOOR_IMPL, help=f"default {FLOOR_IMPL} (the faster here)")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--workers", type=int, default=2, help="processes (default 2)")
    p.add_argument(
        "--shape",
        type=parse_shape,
        default=(-1, 784),
        help="declared input shape (default -1,784; write --shape=-1,784)",
    )
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error("--workers must be >= 1")
    (run_protocol if args.impl == "protocol" else run_uvicorn)(args.port, args.workers, args.shape)
    return 0


if __name__ == "__main__":
    sys.exit(main())
