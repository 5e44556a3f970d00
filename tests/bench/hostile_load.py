"""Hostile clients for the server benchmark: stalled connections held open, and robustness probes.

Stalled connections (a helper process for the whole measurement)::

    python -m tests.bench.hostile_load --port P --conns 200

opens ``--conns`` connections that each send the start of a request (request line and one
header, no blank line) and then nothing, and reopens any the server closes, until SIGTERM. It
prints one JSON line when it stops: how many it holds, opened and saw closed.

``probe_all(host, port, pids)`` runs the probes of issue 12 against one server at once (they
run in parallel threads, so the whole set takes about ``SLOWLORIS_HOLD_S``) and returns one
``Probe`` (name, passed, detail) each.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import selectors
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import psutil

STALL_PREFIX = b"POST /v2/models/stalled/infer HTTP/1.1\r\nHost: bench\r\n"
REFRESH_S = 0.2  # s between checks for connections the server closed
SLOWLORIS_HOLD_S = 15.0  # a header trickle still open after this long holds a connection forever
SLOWLORIS_TRICKLE_S = 1.0  # s between trickled header lines (well under every idle/body timeout)
REPEATED_HEADERS = 5_000
LONG_LINE_BYTES = 8 << 20
IDLE_CONNS = 200
ACCEPT_WINDOW_S = 2.0  # s of back-to-back new connections (one ready probe each) to measure the accept rate
IDLE_SETTLE_S = 2.0  # s the idle connections stay silent before the accept rate is measured: idle, not just opened
ACCEPT_KEEP = 0.5  # the accept rate with idle connections held must stay >= this fraction of the rate without
PIPELINE_S = 5.0  # s a never-reading client keeps sending pipelined requests
PIPELINE_RSS_LIMIT = 64 << 20  # bytes of server RSS growth a never-reading client may cause
ANSWER_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Probe:
    name: str
    passed: bool
    detail: str


# ---------------------------------------------------------------------------------------------- stalled load


def _open_stalled(host: str, port: int) -> socket.socket | None:
    s = socket.socket()
    s.settimeout(5)
    try:
        s.connect((host, port))
        s.sendall(STALL_PREFIX)
    except OSError:
        s.close()
        return None
    s.setblocking(False)
    return s


def hold_stalled(host: str, port: int, conns: int, stop: threading.Event) -> dict[str, int]:
    """Keep ``conns`` stalled connections open until ``stop`` is set; the counts seen meanwhile."""
    sel = selectors.DefaultSelector()
    opened = closed = failed = 0
    while not stop.is_set():
        while len(sel.get_map()) < conns and not stop.is_set():
            s = _open_stalled(host, port)
            if s is None:
                failed += 1
                stop.wait(REFRESH_S)
                break
            sel.register(s, selectors.EVENT_READ)
            opened += 1
        events = sel.select(REFRESH_S)
        if stop.is_set():  # stopped while waiting: what was open then is what was held
            break
        for key, _ in events:
            sock: socket.socket = key.fileobj  # type: ignore[assignment]
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:  # closed by the server (a timeout): the next pass opens a fresh one
                sel.unregister(sock)
                sock.close()
                closed += 1
            # bytes = an error answer before the close; the close itself comes as the next read
    held = len(sel.get_map())
    for key in list(sel.get_map().values()):
        key.fileobj.close()  # type: ignore[union-attr]
    return {"held": held, "opened": opened, "closed_by_server": closed, "connect_failed": failed}


def stalled_cmd(port: int, conns: int) -> list[str]:
    return [sys.executable, "-m", "tests.bench.hostile_load", "--port", str(port), "--conns", str(conns)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench.hostile_load", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--conns", type=int, default=200, help="stalled connections to hold (default 200)")
    args = p.parse_args(argv)
    if args.conns < 1:
        p.error("--conns must be >= 1")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(json.dumps(hold_stalled(args.host, args.port, args.conns, stop)), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------- probes


def _connect(host: str, port: int, timeout: float = ANSWER_TIMEOUT_S) -> socket.socket:
    s = socket.create_connection((host, port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _status(sock: socket.socket) -> int | None:
    """The status code of the first answer on ``sock``; None when it closes (or times out) without one."""
    buf = b""
    try:
        while b"\r\n" not in buf:
            chunk = sock.recv(4096)
            if not chunk:
                return None
            buf += chunk
    except OSError:
        return None
    parts = buf.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None


def _closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """Whether the server closes ``sock`` within ``seconds`` (reading and keeping what it sends meanwhile)."""
    deadline = time.monotonic() + seconds
    got = b""
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return False, got
        except OSError:
            return True, got
        if not chunk:
            return True, got
        got += chunk
    return False, got


def probe_slowloris(host: str, port: int) -> Probe:
    """One header line per second after the request line: the server must close it before SLOWLORIS_HOLD_S."""
    name = f"slowloris headers, one line/{SLOWLORIS_TRICKLE_S:g} s"
    t0 = time.monotonic()
    with _connect(host, port) as s:
        s.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: bench\r\n")
        i = 0
        while (elapsed := time.monotonic() - t0) < SLOWLORIS_HOLD_S:
            closed, _ = _closed_within(s, SLOWLORIS_TRICKLE_S)
            if closed:
                return Probe(name, True, f"closed after {time.monotonic() - t0:.1f} s")
            try:
                s.sendall(b"X-Trickle-%d: a\r\n" % i)
            except OSError:
                return Probe(name, True, f"closed after {time.monotonic() - t0:.1f} s")
            i += 1
        return Probe(name, False, f"still open after {elapsed:.0f} s")


def probe_repeated_headers(host: str, port: int) -> Probe:
    name = f"{REPEATED_HEADERS:,} repeated header lines"
    req = b"GET /v2/health/ready HTTP/1.1\r\nHost: bench\r\n" + b"X-Repeat: a\r\n" * REPEATED_HEADERS + b"\r\n"
    with _connect(host, port) as s:
        try:
            s.sendall(req)
        except OSError:
            return Probe(name, True, "connection closed while sending")
        status = _status(s)
    # Accepting them all (200) means no header count limit: memory and CPU per request are unbounded.
    ok = status is not None and 400 <= status < 500
    return Probe(name, ok or status is None, f"status {status}" if status else "closed, no answer")


def probe_long_line(host: str, port: int) -> Probe:
    name = f"unterminated {LONG_LINE_BYTES >> 20} MiB header line"
    chunk = b"a" * 65536
    sent = 0
    t0 = time.monotonic()
    with _connect(host, port) as s:
        try:
            s.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: bench\r\nX-Long: ")
            while sent < LONG_LINE_BYTES:
                s.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass
        if sent >= LONG_LINE_BYTES:
            # All 8 MiB accepted: the server buffered the line; it must still refuse it, and quickly.
            closed, got = _closed_within(s, ANSWER_TIMEOUT_S)
            status = got.split(b" ", 2)[1].decode() if got.startswith(b"HTTP/") else None
            return Probe(name, closed and status is not None and status.startswith("4"),
                         f"read all {sent >> 20} MiB, then {'status ' + status if status else 'no answer'}"
                         f"{'' if closed else f', open after {ANSWER_TIMEOUT_S:g} s'}")  # fmt: skip
    return Probe(name, True, f"refused after {sent >> 10} KiB in {time.monotonic() - t0:.1f} s")


def _accept_rate(host: str, port: int, seconds: float) -> tuple[float, int]:
    """New connections per second, each answering one ready probe; (rate, failures)."""
    n = failures = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        try:
            with _connect(host, port, timeout=5) as s:
                s.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
                if _status(s) == 200:
                    n += 1
                else:
                    failures += 1
        except OSError:
            failures += 1
    return n / (time.monotonic() - t0), failures


def probe_idle_accept(host: str, port: int, baseline: float) -> Probe:
    name = f"{IDLE_CONNS} idle connections, then accept rate"
    idle: list[socket.socket] = []
    try:
        for _ in range(IDLE_CONNS):
            with contextlib.suppress(OSError):
                idle.append(_connect(host, port, timeout=5))
        time.sleep(IDLE_SETTLE_S)
        rate, failures = _accept_rate(host, port, ACCEPT_WINDOW_S)
        still = sum(1 for s in idle if not _closed_within(s, 0.001)[0])
    finally:
        for s in idle:
            s.close()
    ok = failures == 0 and rate >= ACCEPT_KEEP * baseline
    return Probe(name, ok, f"{rate:,.0f} conn/s vs {baseline:,.0f} without ({failures} failed; "
                           f"{still}/{IDLE_CONNS} idle still open)")  # fmt: skip


def probe_pipeline_no_read(host: str, port: int, pids: Callable[[], list[int]], path: str) -> Probe:
    """Pipelined requests from a client that never reads: the server must stop reading, not buffer answers."""
    name = "never-reading pipelining client"
    req = f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode() * 64
    before = _rss(pids())
    sent = 0
    closed = ""
    with _connect(host, port) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(0.5)
        t0 = sampled = time.monotonic()
        peak = before
        while (now := time.monotonic()) - t0 < PIPELINE_S:
            if now - sampled > 0.1:  # the peak, not the end: a server may free what it buffered when it closes
                peak, sampled = max(peak, _rss(pids())), now
            try:
                sent += s.send(req)
            except TimeoutError:
                continue  # the server stopped reading: what we want; keep pushing until the window ends
            except OSError as exc:
                closed = f", closed by the server after {time.monotonic() - t0:.1f} s ({exc.strerror})"
                break
        peak = max(peak, _rss(pids()))
    growth = peak - before
    detail = (
        f"RSS +{growth / 2**20:.1f} MiB after {sent / 2**20:.1f} MiB of requests{closed or f' in {PIPELINE_S:g} s'}"
    )
    return Probe(name, growth <= PIPELINE_RSS_LIMIT, detail)


def _rss(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += psutil.Process(pid).memory_info().rss
    return total


def probe_request(host: str, port: int, name: str, req: bytes, ok: Callable[[int | None], bool]) -> Probe:
    with _connect(host, port) as s:
        s.sendall(req)
        status = _status(s)
    return Probe(name, ok(status), f"status {status}" if status else "closed, no answer")


PROBES = (
    "slowloris",
    "repeated headers",
    "long header line",
    "idle connections",
    "pipelining, never reading",
    "HTTP/2.0 request line",
    "absolute-form target",
)


def probe_all(
    host: str, port: int, pids: Callable[[], list[int]], pipeline_path: str, only: tuple[str, ...] = PROBES
) -> list[Probe]:
    """The probes named in ``only`` against one server, the slowloris one beside the others, which run one
    at a time so their measurements (accept rate, RSS) are not mixed up."""
    h2 = b"GET /v2/health/ready HTTP/2.0\r\nHost: bench\r\n\r\n"
    absolute = f"GET http://{host}:{port}/v2/health/ready HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()

    def idle() -> Probe:
        baseline, _ = _accept_rate(host, port, ACCEPT_WINDOW_S)
        return probe_idle_accept(host, port, baseline)

    jobs: dict[str, Callable[[], Probe]] = {
        "repeated headers": lambda: probe_repeated_headers(host, port),
        "long header line": lambda: probe_long_line(host, port),
        "idle connections": idle,
        "pipelining, never reading": lambda: probe_pipeline_no_read(host, port, pids, pipeline_path),
        # An HTTP/2.0 request line over HTTP/1.1 framing is not HTTP/2: 505 (or 400), never answered as 1.1.
        "HTTP/2.0 request line": lambda: probe_request(host, port, "HTTP/2.0 request line", h2,
                                                       lambda s: s in (400, 505)),
        # RFC 9112 3.2.2: a server MUST accept the absolute form of a request target.
        "absolute-form target": lambda: probe_request(host, port, "absolute-form target", absolute,
                                                      lambda s: s == 200),
    }  # fmt: skip
    unknown = set(only) - set(PROBES)
    if unknown:
        raise ValueError(f"unknown probes {sorted(unknown)}; choose from {', '.join(PROBES)}")

    def guarded(key: str, job: Callable[[], Probe]) -> Probe:
        try:
            return job()
        except Exception as exc:  # a probe that breaks is a failed probe, with why, not a lost run
            return Probe(key, False, f"probe error: {exc!r}")

    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(guarded, "slowloris", lambda: probe_slowloris(host, port)) if "slowloris" in only else None
        results = {k: guarded(k, job) for k, job in jobs.items() if k in only}
        if slow is not None:
            results["slowloris"] = slow.result()
    return [results[k] for k in PROBES if k in results]


if __name__ == "__main__":
    sys.exit(main())
