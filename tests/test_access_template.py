"""The templated access line (``logs.access_json``) is byte for byte the line ``logs.access_line`` builds."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time

import orjson
import pytest

from services.serving.server import logs


@pytest.mark.parametrize(
    ("model", "version", "rid", "method", "path", "status"),
    [
        ("mlp", "1", "7153abc37420f3674a161c90574b47d7", "POST", "/v2/models/mlp/infer", 200),
        ('we"ird\\name', "2\n", "client-id", "GET", '/a"b\\c/\u00e9', 404),
        ("m", "v", "x" * 200, "DELETE", "/v2/health/ready", 503),
    ],
)
def test_access_json_matches_access_line(
    model: str, version: str, rid: str, method: str, path: str, status: int
) -> None:
    level = logging.ERROR if status >= 500 else logging.WARNING if status >= 400 else logging.INFO
    for now in (1_764_000_000.0, 1_764_000_000.999, 1_764_000_123.0421):
        fields = {
            "labels": {"model": model, "model_version": version},
            "http": {"request": {"id": rid, "method": method}, "response": {"status_code": status}},
            "url": {"path": path},
            "event": {"duration": 15_641_847, "dataset": logs.ACCESS_DATASET},
        }
        want = logs.access_line(now, os.getpid(), level, f"{method} {path} {status}", fields)
        got = logs.access_json(now, level, model, version, rid, method, path, status, 15_641_847)
        assert got == want
        assert orjson.loads(got)["url"]["path"] == path


def _read_lines(fd: int, n: int, timeout_s: float = 10.0) -> bytes:
    """What the buffer wrote, once it holds ``n`` lines (bounded wait)."""
    import select

    got = b""
    deadline = time.monotonic() + timeout_s
    while got.count(b"\n") < n and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.05)[0]:
            got += os.read(fd, 65536)
    return got


def test_a_stalled_log_reader_never_blocks_the_event_loop() -> None:
    """The loop's lines wake the flusher thread from a timer; the write that may block is never the loop's."""
    r, w = os.pipe()
    loop = asyncio.new_event_loop()
    buf = logs.LineBuffer(w, interval=0.005)
    try:
        os.set_blocking(w, False)
        filled = 0
        with contextlib.suppress(BlockingIOError):
            while True:
                filled += os.write(w, b"x" * 65536)
        os.set_blocking(w, True)  # the pipe is full and nobody reads: a write now blocks
        lines = [b"line %d\n" % i for i in range(200)]

        async def put_on_loop() -> None:
            for line in lines:
                buf.put(line)
                await asyncio.sleep(0.001)  # the loop's timers (the flush wake-ups) run meanwhile

        done = threading.Event()

        def run_loop() -> None:
            buf.flush_on(loop)  # this thread runs the loop
            loop.run_until_complete(put_on_loop())
            done.set()

        threading.Thread(target=run_loop, daemon=True).start()
        assert done.wait(60), "the event loop blocked on a stalled stdout"
        assert buf._pid == os.getpid()  # the flusher thread was woken for the loop's lines
        # The reader catches up: everything arrives, in order.
        got = _read_lines(r, 200, timeout_s=30)  # the filler holds no newline
        assert got[filled:] == b"".join(lines)
    finally:
        loop.close()
        os.close(r)
        os.close(w)
