"""The templated access line (``logs.access_json``) is byte for byte the line ``logs.access_line`` builds."""

from __future__ import annotations

import asyncio
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


def test_lines_of_the_loop_thread_are_flushed_by_the_loop_and_others_by_the_thread() -> None:
    r, w = os.pipe()
    loop = asyncio.new_event_loop()
    try:
        buf = logs.LineBuffer(w, interval=0.005)
        buf.flush_on(loop)

        async def put_on_loop() -> None:
            buf.put(b"a\n")
            buf.put(b"b\n")
            await asyncio.sleep(0.05)  # the loop's flush timer runs meanwhile

        loop.run_until_complete(put_on_loop())
        assert _read_lines(r, 2) == b"a\nb\n"
        assert buf._pid == 0  # no flusher thread was started for the loop's lines

        other = threading.Thread(target=buf.put, args=(b"c\n",))  # not the loop's thread: the flusher thread writes it
        other.start()
        other.join()
        assert _read_lines(r, 1) == b"c\n"
        assert buf._pid == os.getpid()
    finally:
        loop.close()
        os.close(r)
        os.close(w)
