"""The event-loop gunicorn worker over raw sockets: framing, limits, pipelining, probes, recycling, balance."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests

from services.serving.server.http1 import HttpConnection
from services.serving.server.worker import EventLoopWorker
from tests.conftest import make_torch_mlp_artifact
from tests.serving import ServerHandle, start_server

BODY = {"inputs": [{"name": "input", "shape": [1, 8], "datatype": "FP32", "data": [0.5] * 8}]}
HANG_S = 60  # s: the bound on every wait, there to end a hang; no test passes or fails on how fast it went


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    art = make_torch_mlp_artifact(tmp_path_factory.mktemp("worker") / "mlp")
    with start_server(art, workers=2, extra_args=["--max-body-bytes", "4096"]) as s:
        yield s


def exchange(srv: ServerHandle, raw: bytes, timeout: float = HANG_S) -> bytes:
    """Send raw bytes, read until the server closes the connection (or ``timeout``)."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=timeout) as s:
        s.sendall(raw)
        chunks = []
        try:
            while data := s.recv(65536):
                chunks.append(data)
        except TimeoutError:
            pass
    return b"".join(chunks)


def infer_request(rid: str, *, close: bool = False, body: bytes | None = None) -> bytes:
    payload = body if body is not None else json.dumps(BODY).encode()
    return (
        f"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nX-Request-ID: {rid}\r\n"
        f"{'Connection: close' + chr(13) + chr(10) if close else ''}\r\n"
    ).encode() + payload


def responses(raw: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Split a byte stream of HTTP/1.1 responses (with Content-Length) into (status, headers, body)."""
    out = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        if status == 100:
            raw = rest
            out.append((status, headers, b""))
            continue
        n = int(headers["content-length"])
        out.append((status, headers, rest[:n]))
        raw = rest[n:]
    return out


def test_pipelined_requests_are_answered_in_order(srv: ServerHandle) -> None:
    raw = infer_request("p-1") + b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Request-ID: p-2\r\n\r\n"
    raw += b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-Request-ID: p-3\r\n\r\n" + infer_request("p-4", close=True)
    got = responses(exchange(srv, raw))
    assert [h["x-request-id"] for _, h, _ in got] == ["p-1", "p-2", "p-3", "p-4"]
    assert [s for s, _, _ in got] == [200, 200, 200, 200]
    assert json.loads(got[0][2])["outputs"][0]["shape"] == [1, 3]
    assert json.loads(got[2][2])["extensions"] == ["binary_tensor_data"]
    assert got[-1][1]["connection"] == "close"


def test_expect_100_continue_is_answered_before_the_body(srv: ServerHandle) -> None:
    payload = json.dumps(BODY).encode()
    head = (
        f"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=HANG_S) as s:
        s.sendall(head)
        assert s.recv(1024).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")  # curl waits a second without it
        s.sendall(payload)
        rest = b""
        while data := s.recv(65536):
            rest += data
    ((status, _, body),) = responses(rest)
    assert status == 200 and json.loads(body)["outputs"][0]["shape"] == [1, 3]


@pytest.mark.parametrize(
    ("raw", "status", "needle"),
    [
        (b"GARBAGE\r\n\r\n", 400, "malformed HTTP request"),
        (b"GET /v2 HTTP/1.1\r\nHost: x\r\nContent-Length: lots\r\n\r\n", 400, "malformed HTTP request"),
        (b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431, "is over 8190 bytes"),
        (
            b"GET /v2 HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(120)) + b"\r\n",
            431,
            "more than 100 header fields",
        ),
        (
            b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
            414,
            "URL is over 8190 bytes",
        ),  # max_header_line_bytes
        (infer_request("big", body=b"[" + b"1," * 4096 + b"1]"), 413, "over the 4096-byte limit"),
    ],
)
def test_bad_framing_gets_a_json_error_and_closes_without_hurting_the_worker(
    srv: ServerHandle, raw: bytes, status: int, needle: str
) -> None:
    pids = srv.worker_pids()
    got = responses(exchange(srv, raw))
    assert len(got) == 1
    code, headers, body = got[0]
    assert code == status and needle in json.loads(body)["error"], (code, body)
    assert headers["connection"] == "close" and headers["content-type"] == "application/json"
    assert requests.get(f"{srv.url}/v2/health/live", timeout=HANG_S).status_code == 200
    assert srv.worker_pids() == pids


def test_upgrade_requests_are_answered_as_http_1_1_then_closed(srv: ServerHandle) -> None:
    """RFC 9110 lets a server ignore Upgrade: an h2c client carries on, a WebSocket client sees no 101."""
    raw = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    ((code, headers, body),) = responses(exchange(srv, raw))
    assert code == 200 and body == b'{"live":true}' and headers["connection"] == "close"


def test_chunked_bodies_are_read_and_limited(srv: ServerHandle) -> None:
    payload = json.dumps(BODY).encode()
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (payload[:20], payload[20:])) + b"0\r\n\r\n"
    head = b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    ok = responses(exchange(srv, head + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunked))
    assert ok[0][0] == 200 and json.loads(ok[0][2])["outputs"][0]["shape"] == [1, 3]
    big = b"".join(b"400\r\n" + b"1" * 1024 + b"\r\n" for _ in range(5)) + b"0\r\n\r\n"
    ((code, _, body),) = responses(exchange(srv, head + b"Transfer-Encoding: chunked\r\n\r\n" + big))
    assert code == 413 and "over the 4096-byte limit" in json.loads(body)["error"]


def test_head_gets_headers_without_a_body(srv: ServerHandle) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=HANG_S)
    conn.request("HEAD", "/v2")
    resp = conn.getresponse()
    assert resp.status == 200 and int(resp.getheader("Content-Length") or 0) > 0 and resp.read() == b""
    conn.request("GET", "/v2")  # the connection is still in sync
    assert json.loads(conn.getresponse().read())["name"] == "dlstack-model-server"
    conn.close()


def test_probes_answer_while_a_long_forward_pass_runs(worker: EventLoopWorker, monkeypatch: pytest.MonkeyPatch) -> None:
    """The forward pass runs in the inference thread: the loop keeps answering liveness and readiness.

    A real worker (its loop, its inference thread, the real model) serves a real socket, and the forward
    pass is held open until both probes are answered. The order of the answers shows it, not their
    latency: a loop that ran the model itself could not answer a probe before the model returned.
    """
    events: list[str] = []
    lock = threading.Lock()

    def record(what: str) -> None:
        with lock:
            events.append(what)

    started, release = threading.Event(), threading.Event()
    real_predict = worker.server.runtime.predict

    def held_predict(inputs: dict[str, object]) -> object:
        record("forward started")
        started.set()
        release.wait(HANG_S)
        record("forward ends")
        return real_predict(inputs)

    monkeypatch.setattr(worker.server.runtime, "predict", held_predict)
    listener = socket.create_server(("127.0.0.1", 0))
    worker.sockets = [SimpleNamespace(sock=listener)]  # what gunicorn's listeners offer the worker
    worker.ppid = os.getppid()  # no gunicorn master here: the worker checks that its parent is still there
    loop_thread = threading.Thread(target=worker.run, daemon=True)
    loop_thread.start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"

    def infer() -> None:
        r = requests.post(f"{url}/v2/models/mlp/infer", json=BODY, timeout=HANG_S)
        record(f"infer {r.status_code} {r.json()['outputs'][0]['shape']}")

    client = threading.Thread(target=infer, daemon=True)
    client.start()
    try:
        assert started.wait(HANG_S), "the forward pass never started"
        for probe in ("live", "ready"):
            try:
                record(f"{probe} {requests.get(f'{url}/v2/health/{probe}', timeout=HANG_S).status_code}")
            except requests.Timeout:
                pytest.fail(f"no answer to /v2/health/{probe} while the forward pass ran: the loop waits for it")
        record("probes answered: the forward pass may end")
    finally:
        release.set()
        client.join(HANG_S)
        worker.loop.call_soon_threadsafe(worker.loop.stop)
        loop_thread.join(HANG_S)
        listener.close()
    assert not loop_thread.is_alive(), "the worker's loop did not stop"
    assert events == [
        "forward started",
        "live 200",
        "ready 200",
        "probes answered: the forward pass may end",
        "forward ends",
        "infer 200 [1, 3]",
    ]


def test_idle_kept_alive_connections_are_closed_after_keepalive_seconds(tmp_path: Path) -> None:
    art = make_torch_mlp_artifact(tmp_path / "m")
    with (
        start_server(art, workers=1, env={"DLSTACK_KEEPALIVE": "1"}) as s,
        socket.create_connection(("127.0.0.1", s.port), timeout=HANG_S) as sock,
    ):
        sent = time.monotonic()  # before the request: the server's idle clock for it starts after this
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while b'{"live":true}' not in answer and (data := sock.recv(4096)):
            answer += data
        ((code, headers, body),) = responses(answer)
        assert code == 200 and body == b'{"live":true}' and headers["connection"] == "keep-alive"
        try:
            rest = sock.recv(4096)
        except TimeoutError:
            pytest.fail(f"the idle connection was still open after {HANG_S} s (keepalive is 1 s)")
        idle = time.monotonic() - sent
    assert rest == b"", rest  # closed by the server (not our timeout), with nothing more sent
    # Causality, not speed: the server closes it no sooner than 1 s after the request reached it, which was
    # after `sent`; a slower machine only makes this larger. It fails only if the connection closed early.
    assert idle >= 1.0, f"closed {idle:.2f} s after the request, before the 1 s keepalive"


def test_max_requests_recycles_workers_without_failing_requests(tmp_path: Path) -> None:
    art = make_torch_mlp_artifact(tmp_path / "m")
    with start_server(art, workers=2, env={"DLSTACK_MAX_REQUESTS": "20"}) as s:
        before = s.worker_pids()
        url = f"{s.url}/v2/models/mlp/infer"
        codes = [requests.post(url, json=BODY, timeout=HANG_S).status_code for _ in range(120)]
        deadline = time.monotonic() + HANG_S
        while len(s.load_events()) < 3 and time.monotonic() < deadline:  # a replacement loaded its model
            time.sleep(0.1)
        after = s.worker_pids()
        loads = s.load_events()
        messages = [str(d.get("message", "")) for d in s.json_lines()]
    assert codes == [200] * 120
    assert len(loads) >= 3 and {e["event"]["outcome"] for e in loads} == {"success"}, loads
    assert [m for m in messages if m.startswith("worker stopping (max_requests)")], "no worker recycled"
    assert not [m for m in messages if m.startswith("graceful timeout")], "a recycle cut requests off"
    assert after - before, "no worker was replaced after max_requests"


def test_connections_are_spread_over_the_workers(tmp_path: Path) -> None:
    """One worker must not take every connection of a burst (the one already awake wins accept races)."""
    art = make_torch_mlp_artifact(tmp_path / "m")
    with start_server(art, workers=2) as s:
        conns = [http.client.HTTPConnection("127.0.0.1", s.port, timeout=HANG_S) for _ in range(16)]
        for i, c in enumerate(conns):
            c.request("GET", "/v2/health/live", headers={"X-Request-ID": f"spread-{i}"})
        for c in conns:
            assert c.getresponse().read() == b'{"live":true}'
            c.close()
        deadline = time.monotonic() + HANG_S
        while True:  # the access lines of other requests (readiness probes) are in the log too
            lines = [d for d in s.access_lines() if d["http"]["request"]["id"].startswith("spread-")]
            if len(lines) >= 16 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    per_worker: dict[int, int] = {}
    for d in lines:
        per_worker[d["process"]["pid"]] = per_worker.get(d["process"]["pid"], 0) + 1
    # Balance is best effort (a worker descheduled by other load accepts less), but never all-or-nothing.
    assert len(lines) == 16 and len(per_worker) == 2 and min(per_worker.values()) >= 2, per_worker


class RecordingTransport(asyncio.Transport):
    """Collects what the server writes; the only stand-in here, for the socket."""

    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.out += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[EventLoopWorker]:
    """A real EventLoopWorker around a real app and model, outside gunicorn's master (no sockets)."""
    from gunicorn import glogging
    from gunicorn.config import Config

    from services.serving.server.app import create_app
    from services.serving.server.settings import ServerSettings

    art = make_torch_mlp_artifact(tmp_path / "mlp")

    class App:  # what gunicorn's Application hands a worker
        def wsgi(self) -> object:
            return create_app(ServerSettings(artifact_dir=art), background_load=False)

    cfg = Config()
    w = EventLoopWorker(0, os.getpid(), [], App(), 30, cfg, glogging.Logger(cfg))
    w.load_wsgi()
    yield w
    w.infer_thread.shutdown()
    w.http_pool.shutdown()
    w.loop.close()
    w.tmp.close()


def connect(worker: EventLoopWorker) -> tuple[HttpConnection, RecordingTransport]:
    conn, transport = HttpConnection(worker), RecordingTransport()
    worker.nr_conns += 1
    conn.connection_made(transport)
    return conn, transport


def test_a_bug_in_a_route_is_a_500_with_the_request_id_and_the_connection_lives(
    worker: EventLoopWorker, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from services.serving.server import lifecycle

    def broken() -> bool:
        raise RuntimeError("bug in ready")

    monkeypatch.setattr(lifecycle, "draining", broken)  # what the readiness route asks first
    conn, transport = connect(worker)
    conn.data_received(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nX-Request-ID: bug-1\r\n\r\n")
    ((code, headers, body),) = responses(bytes(transport.out))
    assert code == 500 and json.loads(body) == {
        "error": "internal error (request id bug-1); the server log has the details",
        "request_id": "bug-1",
    }
    assert headers["connection"] == "keep-alive" and not transport.closed
    monkeypatch.undo()
    transport.out.clear()
    conn.data_received(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
    assert responses(bytes(transport.out))[0][2] == b'{"ready":true}'
    assert worker.inflight == 0


def test_a_bug_while_reading_a_request_is_a_500_and_closes(
    worker: EventLoopWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker, "limit_fields", None)  # on_header now fails comparing None >= int
    conn, transport = connect(worker)
    conn.data_received(b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-Request-ID: bug-2\r\n\r\n")
    ((code, headers, body),) = responses(bytes(transport.out))
    # it failed on the first header, before X-Request-ID: the answer carries the id it generated
    assert code == 500 and json.loads(body)["request_id"] == headers["x-request-id"] != "bug-2"
    assert "internal error while reading the request" in json.loads(body)["error"]
    assert headers["connection"] == "close" and transport.closed
    assert worker.inflight == 0 and worker.batcher.arriving == 0
