"""``dlstack serve ARTIFACT_DIR``: verify the artifact, then exec gunicorn with ``gunicorn_conf``."""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

from services.serving.errors import UserError
from services.serving.server.settings import LOG_FORMATS, ServerSettings

APP = "services.serving.server.app:create_app()"
CONF = "python:services.serving.server.gunicorn_conf"


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "serve",
        help="serve a model artifact over the Open Inference Protocol V2 (gunicorn)",
        description="Serve ARTIFACT_DIR (model.yaml + files) with gunicorn; flags override model.yaml `serving`.",
    )
    p.add_argument("artifact_dir", metavar="ARTIFACT_DIR", type=Path)
    p.add_argument("--host", default="0.0.0.0", help="address to bind (default 0.0.0.0)")
    p.add_argument("--port", type=_port, default=8080, help="port to bind (default 8080)")
    p.add_argument("--workers", type=_positive, help="worker processes (default: the CPU limit)")
    p.add_argument(
        "--threads",
        type=_positive,
        help="threads per worker for routes that may block (/metrics, requests during the model load); default 4",
    )
    p.add_argument(
        "--max-batch-size",
        type=_positive,
        help="rows per forward pass; 1 = batching off (default: model.yaml, else 8 for a variable batch dim)",
    )
    p.add_argument("--max-batch-time-ms", type=float, help="ms the first request of a batch waits for more")
    p.add_argument("--max-body-bytes", type=_body_bytes, help="request body limit, >= 1024 (default 16 MiB)")
    p.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        help="stdout log lines: json (ECS, for log shippers) or text (readable); "
        "default auto = text on a terminal, json otherwise (env DLSTACK_LOG_FORMAT)",
    )
    p.set_defaults(func=handler)


def _positive(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{raw!r} must be >= 1")
    return value


def _port(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not an integer") from None
    if not 0 <= value <= 65535:  # 0 = any free port, as for bind()
        raise argparse.ArgumentTypeError(f"{raw!r} is not a TCP port; use 1-65535")
    return value


def _body_bytes(raw: str) -> int:
    value = _positive(raw)
    if value < 1024:
        raise argparse.ArgumentTypeError(f"{raw!r} is too small; the limit must be at least 1024 bytes")
    return value


def server_env(args: argparse.Namespace, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment gunicorn runs with: flags become DLSTACK_* variables (ServerSettings fields)."""
    env = dict(os.environ if base is None else base)
    bind = f"[{args.host}]:{args.port}" if ":" in args.host else f"{args.host}:{args.port}"
    flags = {
        "workers": args.workers,
        "http_threads": args.threads,
        "max_batch_size": args.max_batch_size,
        "max_batch_time_ms": args.max_batch_time_ms,
        "max_body_bytes": args.max_body_bytes,
        "log_format": args.log_format,
    }
    env[ServerSettings.env_name("artifact_dir")] = str(args.artifact_dir.resolve())
    env[ServerSettings.env_name("bind")] = bind
    env.update({ServerSettings.env_name(k): str(v) for k, v in flags.items() if v is not None})
    if not env.get("PROMETHEUS_MULTIPROC_DIR"):
        env["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="dlstack-metrics-")
        env["DLSTACK_OWNS_METRICS_DIR"] = "1"
    return env


def check_port(host: str, port: int) -> None:
    """Bind and release ``host:port`` as gunicorn will, so a busy port is one line now, not five retries later.

    Same family choice and ``SO_REUSEADDR`` as gunicorn's sockets: a port held only by TIME_WAIT
    connections of a previous run passes, a port another process listens on does not.
    """
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    fix = "choose another with --port N (or PORT=N make serve)"
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except socket.gaierror as exc:
            why = exc.strerror
            raise UserError(f"--host {host!r} does not resolve ({why}); give an address, e.g. 0.0.0.0") from None
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UserError(f"port {port} on {host} is already in use (another server?); {fix}") from None
            if exc.errno == errno.EACCES:
                raise UserError(f"port {port} on {host} needs privileges to bind; {fix} with N >= 1024") from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise UserError(
                    f"--host {host} is not an address of this machine; use 0.0.0.0 (all) or 127.0.0.1 (local only)"
                ) from None
            raise UserError(f"cannot bind {host}:{port} ({exc.strerror}); check --host and --port") from None


def handler(args: argparse.Namespace) -> int:
    from services.serving.artifact import load_spec

    if args.max_batch_time_ms is not None and args.max_batch_time_ms < 0:
        raise UserError(f"--max-batch-time-ms must be >= 0, got {args.max_batch_time_ms}")
    if not args.artifact_dir.is_dir():
        raise UserError(f"{args.artifact_dir}: not a directory; pass an artifact made by `dlstack package`")
    check_port(args.host, args.port)  # before hashing the model files, which takes seconds for a large model
    load_spec(args.artifact_dir)  # fail fast, before gunicorn, on a missing or corrupted file
    env = server_env(args)
    try:
        ServerSettings.from_env(env)  # what the workers will read: bad values fail here, not in every worker
    except UserError:
        if env.get("DLSTACK_OWNS_METRICS_DIR") == "1":
            shutil.rmtree(env["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
        raise
    argv = [sys.executable, "-m", "gunicorn", "-c", CONF, APP]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)
    return 0  # not reached
