"""The model server of one worker (``ModelServer``) and its WSGI front end, built by ``create_app``.

The model is loaded here, i.e. after fork, in each worker. A model that fails to load
(corrupted file, bad signature) leaves the worker live but not ready, with the reason in
the log and in the 503 body of ``/v2/health/ready``.

``create_app`` returns a Flask app because gunicorn loads it (``services.serving.server.app:create_app()``)
and tests use its test client, but Flask neither routes nor answers: its ``url_map`` is the route
table's (``routes.TABLE``) and its ``wsgi_app`` is ``WsgiFrontEnd``, which answers every request
through the table and the one inference path (``inference``). The event-loop worker
(``worker.EventLoopWorker``) and the ASGI app (``asgi``) do the same on their event loops.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable, Iterable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import orjson
from flask import Flask

from services.serving.artifact import ModelSpec, load_spec, read_spec
from services.serving.errors import DlstackError, NotFound, NotReady, PayloadTooLarge
from services.serving.server import drift, lifecycle, logs, predlog
from services.serving.server.batching import Batcher, rows_of
from services.serving.server.inference import answer, notify, record, too_large
from services.serving.server.metrics import ModelMetrics
from services.serving.server.observe import Observer
from services.serving.server.protocol import Signature, Tensors
from services.serving.server.routes import STATUS, Call, Router, error_reply, request_id
from services.serving.server.routes import Reply as Reply  # http1.py imports it from here
from services.serving.server.settings import ServerSettings

EXTENSIONS = ("binary_tensor_data",)
PLATFORMS = {
    "pytorch": "pytorch_libtorch",
    "onnx": "onnxruntime_onnx",
    "tensorflow": "tensorflow_savedmodel",
    "keras": "keras",
}
LOAD_WAIT_S = 60.0  # s an inference request waits for a model that is still loading, then 503

try:
    SERVER_VERSION = version("dlstack")
except PackageNotFoundError:  # running from a source tree without install
    SERVER_VERSION = "0.0.0"


class ModelServer:
    """One model in one worker: spec, runtime, batcher, cached metadata and metrics."""

    def __init__(self, config: ServerSettings) -> None:
        self.config = config
        self.reason: str | None = "model is loading"
        self.loaded = threading.Event()  # set when loading ended, well or not
        self.runtime: Any = None
        try:
            spec: ModelSpec | None = read_spec(config.artifact_dir)
        except DlstackError as exc:
            spec = None
            self.reason = exc.message
        self.spec = spec
        self.name = spec.name if spec else config.artifact_dir.name
        self.version = spec.version if spec else "unknown"
        self.metrics = ModelMetrics(self.name, self.version)
        serving = spec.serving if spec else None
        self.effective = config.effective(spec)  # env/flags over model.yaml; reported in the model metadata
        self.max_body_bytes = self.effective.max_body_bytes
        self.signature = Signature(spec, serving.reject_nonfinite) if spec and serving else None
        self.batcher = Batcher(
            self.forward,
            self.effective.max_batch_size,
            self.effective.max_batch_time_ms,
        )
        self.server_metadata = orjson.dumps(
            {"name": logs.SERVICE_NAME, "version": SERVER_VERSION, "extensions": list(EXTENSIONS)}
        )
        self.model_metadata = orjson.dumps(self._metadata()) if spec else b"{}"
        self.router = Router(self.name, self.version)
        # Told about every inference answer (prediction log, drift); empty by default, then free.
        self.observers: list[Observer] = []
        self._openapi: bytes | None = None

    @property
    def ready(self) -> bool:
        return self.reason is None and not lifecycle.draining()

    def load(self) -> None:
        try:
            self._load()
        finally:
            self.loaded.set()

    def _load(self) -> None:
        if self.spec is None:
            logs.event(f"model not ready: {self.reason}", level=logging.ERROR, event__outcome="failure")
            return
        threads = None
        from services.serving.runtimes import create_runtime

        t0 = time.perf_counter()
        try:
            spec = load_spec(self.config.artifact_dir)  # re-hash in the worker: the files may have changed
            threads = self.config.effective(spec).intra_op_threads
            runtime = create_runtime(spec, self.config.artifact_dir, threads)
            runtime.load()
        except Exception as exc:
            self.reason = exc.message if isinstance(exc, DlstackError) else f"{type(exc).__name__}: {exc}"
            logs.event(
                f"model not ready: {self.reason}",
                level=logging.ERROR,
                event__outcome="failure",
                labels__model=self.name,
                labels__model_version=self.version,
                error__message=self.reason,
                error__type=type(exc).__name__,
            )
            return
        seconds = time.perf_counter() - t0
        # The framework, the model and everything imported live as long as the worker. Frozen, they leave the
        # collector's full passes, which objects that outlive a few requests (queued prediction-log events,
        # arrays kept for drift binning) trigger every few seconds and which took ~0.1 s each with torch
        # loaded. freeze() only moves list heads: it writes to no object, so pages shared with the master stay
        # shared. Cyclic garbage left by the load is kept, once, rather than walked on every full pass.
        gc.freeze()
        self.runtime = runtime
        self.reason = None
        self.metrics.loaded(spec.framework.value, spec.sha256, seconds)
        logs.event(
            f"model {self.name}:{self.version} ready in {seconds:.2f}s ({threads or 'default'} intra-op threads)",
            event__outcome="success",
            labels__intra_op_threads=str(threads or "default"),
            labels__model=self.name,
            labels__model_version=self.version,
            event__duration=int(seconds * 1e9),
        )

    def _metadata(self) -> dict[str, Any]:
        assert self.spec is not None
        sig = self.spec.signature

        def tensors(ts: Iterable[Any]) -> list[dict[str, Any]]:
            return [{"name": t.name, "datatype": t.datatype.value, "shape": list(t.shape)} for t in ts]

        return {
            "name": self.name,
            "versions": [self.version],
            "platform": PLATFORMS.get(self.spec.framework.value, self.spec.framework.value),
            "inputs": tensors(sig.inputs),
            "outputs": tensors(sig.outputs),
            # What this server does with the model (env/flags over model.yaml), so a user can check a rollout.
            "parameters": {
                "max_batch_size": self.effective.max_batch_size,
                "max_batch_time_ms": self.effective.max_batch_time_ms,
                "max_body_bytes": self.effective.max_body_bytes,
                "intra_op_threads": self.effective.intra_op_threads,
            },
        }

    def forward(self, inputs: Tensors) -> Tensors:
        t0 = time.perf_counter()
        out: Tensors = self.runtime.predict(inputs)
        self.metrics.inference.observe(time.perf_counter() - t0)
        self.metrics.batch_size.observe(rows_of(inputs))
        return out

    def check(self, name: str, version: str | None) -> None:
        if name != self.name:
            raise NotFound(f"unknown model {name!r}; this server serves {self.name!r}")
        if version is not None and version != self.version:
            raise NotFound(f"model {name!r} has no version {version!r}; this server serves version {self.version!r}")

    def require_ready(self) -> Signature:
        if not self.loaded.is_set():
            self.loaded.wait(LOAD_WAIT_S)
        if self.reason is not None or self.signature is None:
            raise NotReady(f"model {self.name!r} is not ready: {self.reason}")
        return self.signature

    def openapi(self) -> bytes:
        """The OpenAPI document of the route table, built on first use."""
        if self._openapi is None:
            from services.serving.server.openapi import openapi_document

            self._openapi = orjson.dumps(openapi_document(self.router.table))
        return self._openapi


def read_body(environ: dict[str, Any], limit: int) -> bytes:
    """The WSGI request body, refused (413) as soon as it is known to be over ``limit``."""
    length = environ.get("CONTENT_LENGTH")
    stream = environ["wsgi.input"]
    if length:
        try:
            n = int(length)
        except ValueError:
            raise DlstackError(f"Content-Length {length[:32]!r} is not a number", 400) from None
        if n > limit:
            raise PayloadTooLarge(too_large(n, limit))
        body: bytes = stream.read(n)
        return body
    if environ.get("HTTP_TRANSFER_ENCODING", "").lower() != "chunked":
        return b""
    body = stream.read(limit + 1)  # read at most one byte past the limit
    if len(body) > limit:
        raise PayloadTooLarge(too_large(None, limit))
    return body


def environ_headers(environ: dict[str, Any]) -> dict[str, str]:
    """The request headers of a WSGI environ, by lower-case name (as the other front ends have them)."""
    headers = {k[5:].lower().replace("_", "-"): v for k, v in environ.items() if k.startswith("HTTP_")}
    for key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
        if environ.get(key):
            headers[key.lower().replace("_", "-")] = environ[key]
    return headers


class WsgiFrontEnd:
    """The WSGI front end: every request through the route table, answered in the calling thread.

    It serves the Flask test client, any other WSGI server, and nothing in production: the event-loop
    worker answers requests itself. It keeps the in-flight gauge, since no worker does it here.
    """

    def __init__(self, server: ModelServer) -> None:
        self.server = server

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        t0 = time.perf_counter_ns()
        s = self.server
        headers = environ_headers(environ)
        method = environ["REQUEST_METHOD"]
        call = Call(method, environ.get("PATH_INFO", ""), headers, b"", request_id(headers.get("x-request-id")), t0)
        s.metrics.inflight.inc()
        try:
            try:
                call.body = read_body(environ, s.max_body_bytes)
                route, call.params = s.router.match(method, call.path)
                reply = answer(s, route, call)
            except Exception as exc:
                reply = error_reply(exc, call)
        finally:
            s.metrics.inflight.dec()
        record(s, call, reply.status)
        start_response(
            STATUS[reply.status],
            [
                ("Content-Type", reply.content_type),
                ("Content-Length", str(len(reply.body))),
                ("X-Request-ID", call.request_id),
                *reply.headers,
            ],
        )
        notify(s, call, reply.status)
        return [] if method == "HEAD" else [reply.body]


def start_server(config: ServerSettings | None = None, *, background_load: bool = True) -> ModelServer:
    """The model server of this worker with its observers, its model loading: what every front end starts with."""
    logs.setup()
    config = config or ServerSettings.from_env()  # gunicorn_conf validated it in the master
    server = ModelServer(config)
    predlog.install(server, config)  # the sampled prediction log, when the settings turn it on
    drift.install(server, config)  # drift bins, when the artifact has a reference and drift_sample > 0
    if background_load:
        threading.Thread(target=server.load, name="dlstack-model-load", daemon=True).start()
    else:
        server.load()
    return server


def create_app(config: ServerSettings | None = None, *, background_load: bool = True) -> Flask:
    """App factory; gunicorn calls it in each worker (``services.serving.server.app:create_app()``).

    The model loads in a background thread so ``/v2/health/live`` answers at once (a liveness
    probe must not kill a pod that is loading a big model); readiness is 503 until it is loaded,
    and an inference request that arrives meanwhile waits for the load (up to ``LOAD_WAIT_S``).
    """
    server = start_server(config, background_load=background_load)
    app = Flask("dlstack", static_folder=None)
    app.extensions["dlstack"] = server
    app.url_map = server.router.url_map  # the route table, for url_for, the test client and the OpenAPI test
    app.wsgi_app = WsgiFrontEnd(server)  # type: ignore[method-assign]
    return app
