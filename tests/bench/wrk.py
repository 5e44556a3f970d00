"""Drive an HTTP endpoint with wrk (POST bodies through a Lua script) and parse its report."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_LAT = re.compile(r"^\s*(50|75|90|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.M)
_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
_TOTAL = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h)", re.M)
_NON2XX = re.compile(r"^\s*Non-2xx or 3xx responses:\s+(\d+)", re.M)
_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")

LUA = """\
local f = assert(io.open({body!r}, "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
{headers}
"""


class WrkError(RuntimeError):
    """wrk failed or printed something this parser does not understand."""


@dataclass(frozen=True)
class WrkResult:
    requests: int  # completed requests
    rps: float  # requests per second
    p50_ms: float  # latency percentiles in milliseconds
    p90_ms: float
    p99_ms: float
    errors: int  # non-2xx responses plus socket errors (timeouts included)


def parse(text: str) -> WrkResult:
    """Parse ``wrk --latency`` output; raise WrkError naming what is missing."""
    lat = {p: float(v) * _UNITS[u] for p, v, u in _LAT.findall(text)}
    rps = _RPS.search(text)
    total = _TOTAL.search(text)
    missing = [k for k in ("50", "90", "99") if k not in lat]
    if rps is None or total is None or missing:
        raise WrkError(f"unrecognised wrk output (run with --latency?); missing {missing or 'Requests/sec'}:\n{text}")
    errors = sum(int(x) for x in _SOCKET.findall(text)[0]) if _SOCKET.search(text) else 0
    non2xx = _NON2XX.search(text)
    errors += int(non2xx.group(1)) if non2xx else 0
    return WrkResult(
        requests=int(total.group(1)),
        rps=float(rps.group(1)),
        p50_ms=lat["50"],
        p90_ms=lat["90"],
        p99_ms=lat["99"],
        errors=errors,
    )


def run(
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    connections: int,
    duration_s: float,
    threads: int = 2,
    timeout_s: float = 10.0,
) -> tuple[WrkResult, str]:
    """POST ``body`` to ``url`` for ``duration_s`` with ``connections`` open connections; (result, raw output)."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise WrkError("wrk is not installed; install it with `sudo apt-get install -y wrk`")
    with tempfile.TemporaryDirectory(prefix="dlstack-wrk-") as tmp:
        body_path = Path(tmp) / "body"
        body_path.write_bytes(body)
        lua = Path(tmp) / "post.lua"
        hdrs = "\n".join(f"wrk.headers[{k!r}] = {v!r}" for k, v in headers.items())
        lua.write_text(LUA.format(body=str(body_path), headers=hdrs))
        cmd = [
            wrk,
            f"-t{min(threads, connections)}",
            f"-c{connections}",
            f"-d{max(1, round(duration_s))}s",
            f"--timeout={timeout_s:g}s",
            "--latency",
            "-s",
            str(lua),
            url,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + 60, check=False)
    if proc.returncode != 0:
        raise WrkError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}")
    return parse(proc.stdout), proc.stdout
