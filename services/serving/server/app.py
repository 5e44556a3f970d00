"""The Flask app: V2 + V1 routes around one model, built per gunicorn worker by ``create_app``.

The model is loaded here, i.e. after fork, in each worker. A model that fails to load
(corrupted file, bad signature) leaves the worker live but not ready, with the reason in
the log and in the 503 body of ``/v2/health/ready``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http import HTTPStatus
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import orjson
from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from services.serving.artifact import ModelSpec, load_spec, read_spec
from services.serving.errors import DlstackError, NotFound, NotReady, PayloadTooLarge, UserError
from services.serving.server import lifecycle, logs
from services.serving.server.batching import Batcher, rows_of
from services.serving.server.config import ServerConfig
from services.serving.server.metrics import CONTENT_TYPE, ModelMetrics, exposition
from services.serving.server.protocol import InferRequest, Signature, Tensors

JSON = "application/json"
HEADER_LENGTH = "Inference-Header-Content-Length"
EXTENSIONS = ("binary_tensor_data",)
PLATFORMS = {
    "pytorch": "pytorch_libtorch",
    "onnx": "onnxruntime_onnx",
    "tensorflow": "tensorflow_savedmodel",
    "keras": "keras",
}
LOAD_WAIT_S = 60.0  # s an inference request waits for a model that is still loading, then 503
_BODY_TYPES = ("", "application/json", "application/octet-stream")

try:
    SERVER_VERSION = version("dlstack")
except PackageNotFoundError:  # running from a source tree without install
    SERVER_VERSION = "0.0.0"


class UnsupportedMediaType(DlstackError):
    status = 415


class ModelServer:
    """One model in one worker: spec, runtime, batcher, cached metadata and metrics."""

    def __init__(self, config: ServerConfig) -> None:
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
        self.max_body_bytes = config.max_body_bytes or (serving.max_body_bytes if serving else 16 << 20)
        self.signature = Signature(spec, serving.reject_nonfinite) if spec and serving else None
        self.batcher = Batcher(
            self.forward,
            config.max_batch_size or (serving.max_batch_size if serving else 1),
            config.max_batch_time_ms
            if config.max_batch_time_ms is not None
            else (serving.max_batch_time_ms if serving else 0),
        )
        self.server_metadata = orjson.dumps(
            {"name": logs.SERVICE_NAME, "version": SERVER_VERSION, "extensions": list(EXTENSIONS)}
        )
        self.model_metadata = orjson.dumps(self._metadata()) if spec else b"{}"

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
            threads = self.config.intra_op_threads or spec.serving.threads
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

    def predict(self, decode: Callable[[], Tensors]) -> Tensors:
        """Decode and run; with batching on, tell the batcher a request is coming before decoding it."""
        if not self.batcher.enabled:
            return self.forward(decode())
        self.batcher.begin()
        try:
            inputs = decode()
        except BaseException:
            self.batcher.cancel()
            raise
        return self.batcher.submit(inputs)


def check_body(content_type: str, body: bytes, limit: int) -> bytes:
    """The request body of an inference route, or the 4xx that says what to send instead."""
    ctype = content_type.split(";", 1)[0].strip().lower()
    if ctype not in _BODY_TYPES and not ctype.endswith("+json"):
        raise UnsupportedMediaType(
            f"Content-Type {ctype!r} is not supported; send application/json (or application/octet-stream "
            f"with the {HEADER_LENGTH} header for binary tensors)"
        )
    if len(body) > limit:
        raise PayloadTooLarge(too_large(len(body), limit))
    if not body:
        raise UserError("the request body is empty; send a JSON inference request")
    return body


def too_large(n: int | None, limit: int) -> str:
    size = f"{n} bytes," if n is not None else "chunked and"
    return (
        f"request body is {size} over the {limit}-byte limit; send fewer rows per request, use the "
        "binary tensor extension, or raise serving.max_body_bytes / --max-body-bytes"
    )


def read_body(environ: dict[str, Any], limit: int) -> bytes:
    length = environ.get("CONTENT_LENGTH")
    stream = environ["wsgi.input"]
    if length:
        n = int(length)
        if n > limit:
            raise PayloadTooLarge(too_large(n, limit))
        body: bytes = stream.read(n)
    else:  # chunked: read at most one byte past the limit
        body = stream.read(limit + 1)
        if len(body) > limit:
            raise PayloadTooLarge(too_large(None, limit))
    return check_body(environ.get("CONTENT_TYPE", ""), body, limit)


@dataclass(frozen=True, slots=True)
class Reply:
    """What a view answers; Flask and the WSGI fast path both turn it into a response."""

    body: bytes
    status: int = 200
    content_type: str = JSON
    headers: tuple[tuple[str, str], ...] = ()

    def flask(self) -> Response:
        return Response(self.body, status=self.status, content_type=self.content_type, headers=list(self.headers))


_STATUS: dict[int, str] = {int(code): f"{int(code)} {code.phrase}" for code in HTTPStatus}


def error_reply(exc: BaseException, environ: dict[str, Any]) -> Reply:
    """The one error mapping: DlstackError -> its status, werkzeug HTTP errors -> theirs, else 500 with the id."""
    rid = environ.get("dlstack.request_id")
    if isinstance(exc, DlstackError):
        status, msg = exc.status, exc.message
    elif isinstance(exc, HTTPException):
        status, msg = exc.code or 500, f"{exc.name}: {exc.description}"
    else:
        status = 500
        msg = f"internal error (request id {rid}); the server log has the details"
        logs.server_log.error(
            "unhandled error (request id %s): %s",
            rid,
            "".join(traceback.format_exception(exc)),
            extra={"http.request.id": rid, "event.dataset": logs.SERVER_DATASET},
        )
    environ["dlstack.error"] = (msg, type(exc).__name__)
    body: dict[str, Any] = {"error": msg}
    if status >= 500:
        body["request_id"] = rid
    return Reply(orjson.dumps(body), status)


class Views:
    """The route handlers, written against the WSGI environ so the fast path can call them without Flask."""

    def __init__(self, server: ModelServer) -> None:
        self.s = server

    def infer(self, environ: dict[str, Any], name: str, version: str | None = None) -> Reply:
        s = self.s
        s.check(name, version)
        sig = s.require_ready()
        body = read_body(environ, s.max_body_bytes)
        header_length = environ.get("HTTP_INFERENCE_HEADER_CONTENT_LENGTH")
        decoded: list[InferRequest] = []

        def decode() -> Tensors:
            req = sig.decode(body, header_length)
            decoded.append(req)
            return req.inputs

        outputs = s.predict(decode)
        return infer_reply(sig, decoded[0], outputs)

    def v1_predict(self, environ: dict[str, Any], name: str) -> Reply:
        s = self.s
        s.check(name, None)
        sig = s.require_ready()
        body = read_body(environ, s.max_body_bytes)
        return Reply(sig.encode_v1(s.predict(lambda: sig.decode_v1(body))))

    def live(self) -> Reply:
        return Reply(b'{"live":true}')

    def ready(self) -> Reply:
        s = self.s
        if s.ready:
            return Reply(b'{"ready":true}')
        reason = "the server is draining (SIGTERM received)" if lifecycle.draining() else s.reason
        return Reply(orjson.dumps({"ready": False, "error": f"not ready: {reason}"}), 503)


def infer_reply(sig: Signature, req: InferRequest, outputs: Tensors) -> Reply:
    data, json_len = sig.encode(req, outputs)
    if json_len is None:
        return Reply(data)
    return Reply(data, 200, "application/octet-stream", ((HEADER_LENGTH, str(json_len)),))


class AccessLog:
    """WSGI middleware: request id, in-flight gauge, one access log line and request metrics per request.

    It also answers the hot routes (infer, health) itself, through the same ``Views`` the Flask rules
    use, skipping Flask's request context and routing: about half of a small request's CPU time.
    """

    def __init__(self, app: Callable[..., Any], server: ModelServer, views: Views) -> None:
        self.app = app
        self.server = server
        n, v = server.name, server.version
        self.fast: dict[tuple[str, str], tuple[str, Callable[[dict[str, Any]], Reply]]] = {
            ("POST", f"/v2/models/{n}/infer"): ("infer", lambda env: views.infer(env, n)),
            ("POST", f"/v2/models/{n}/versions/{v}/infer"): ("infer", lambda env: views.infer(env, n, v)),
            ("POST", f"/v1/models/{n}:predict"): ("v1_predict", lambda env: views.v1_predict(env, n)),
            ("GET", "/v2/health/live"): ("live", lambda env: views.live()),
            ("GET", "/v2/health/ready"): ("ready", lambda env: views.ready()),
        }

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        t0 = time.perf_counter_ns()
        rid = environ.get("HTTP_X_REQUEST_ID")
        if not rid or len(rid) > 200:
            rid = os.urandom(16).hex()  # a uuid4().hex without building a UUID
        environ["dlstack.request_id"] = rid
        m = self.server.metrics
        # The event-loop worker counts its requests (these included) and sets the gauge itself.
        own_gauge = "dlstack.worker" not in environ
        if own_gauge:
            m.inflight.inc()
        try:
            fast = self.fast.get((environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")))
            if fast is not None:
                environ["dlstack.route"] = fast[0]
                try:
                    reply = fast[1](environ)
                except Exception as exc:
                    reply = error_reply(exc, environ)
                code = reply.status
                start_response(
                    _STATUS[code],
                    [
                        ("Content-Type", reply.content_type),
                        ("Content-Length", str(len(reply.body))),
                        ("X-Request-ID", rid),
                        *reply.headers,
                    ],
                )
                body: Iterable[bytes] = (reply.body,)
            else:
                status: list[str] = []

                def sr(st: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
                    status.append(st)
                    headers.append(("X-Request-ID", rid))
                    return start_response(st, headers, exc_info)

                body = self.app(environ, sr)
                code = int(status[0][:3]) if status else 500
        finally:
            if own_gauge:
                m.inflight.dec()
        elapsed = time.perf_counter_ns() - t0
        m.request(environ.get("dlstack.route", "other"), code, elapsed / 1e9)
        err = environ.get("dlstack.error")
        logs.access(
            model=m.model,
            version=m.version,
            request_id=rid,
            method=environ["REQUEST_METHOD"],
            path=environ.get("PATH_INFO", ""),
            status=code,
            duration_ns=elapsed,
            error=err[0] if err else None,
            error_type=err[1] if err else None,
        )
        return body


def create_app(config: ServerConfig | None = None, *, background_load: bool = True) -> Flask:
    """App factory; gunicorn calls it in each worker (``services.serving.server.app:create_app()``).

    The model loads in a background thread so ``/v2/health/live`` answers at once (a liveness
    probe must not kill a pod that is loading a big model); readiness is 503 until it is loaded,
    and an inference request that arrives meanwhile waits for the load (up to ``LOAD_WAIT_S``).
    """
    logs.setup()
    config = config or ServerConfig.from_env()
    server = ModelServer(config)
    if background_load:
        threading.Thread(target=server.load, name="dlstack-model-load", daemon=True).start()
    else:
        server.load()
    app = Flask("dlstack", static_folder=None)
    app.extensions["dlstack"] = server
    views = Views(server)
    register_routes(app, server, views)
    app.wsgi_app = AccessLog(app.wsgi_app, server, views)  # type: ignore[method-assign]
    return app


def register_routes(app: Flask, s: ModelServer, views: Views) -> None:
    """Endpoint names are the ``route`` metric label; each view's docstring is its OpenAPI summary."""

    @app.before_request
    def _route() -> None:
        request.environ["dlstack.route"] = request.endpoint or "other"

    @app.errorhandler(Exception)
    def _error(exc: Exception) -> Response:
        return error_reply(exc, request.environ).flask()

    @app.get("/v2/health/live", endpoint="live")
    def live() -> Response:
        """Liveness: the process answers; never depends on the model."""
        return views.live().flask()

    @app.get("/v2/health/ready", endpoint="ready")
    def ready() -> Response:
        """Readiness: 200 once the model is loaded, 503 before that, on a load failure and while draining."""
        return views.ready().flask()

    @app.get("/v2", endpoint="server_metadata")
    def server_metadata() -> Response:
        """Server metadata: name, version and the protocol extensions supported."""
        return Reply(s.server_metadata).flask()

    @app.get("/v2/models/<name>", endpoint="model_metadata")
    @app.get("/v2/models/<name>/versions/<version>", endpoint="model_metadata")
    def model_metadata(name: str, version: str | None = None) -> Response:
        """Model metadata: name, versions, platform, inputs and outputs."""
        s.check(name, version)
        if s.spec is None:
            s.require_ready()
        return Reply(s.model_metadata).flask()

    @app.get("/v2/models/<name>/ready", endpoint="model_ready")
    @app.get("/v2/models/<name>/versions/<version>/ready", endpoint="model_ready")
    @app.get("/v1/models/<name>", endpoint="model_ready")
    def model_ready(name: str, version: str | None = None) -> Response:
        """Model readiness: 200 when the model can serve, else 503 with the reason."""
        s.check(name, version)
        if s.ready:
            return Reply(orjson.dumps({"name": name, "ready": True})).flask()
        reason = s.reason or "the server is draining"
        return Reply(orjson.dumps({"name": name, "ready": False, "error": f"not ready: {reason}"}), 503).flask()

    @app.post("/v2/models/<name>/infer", endpoint="infer")
    @app.post("/v2/models/<name>/versions/<version>/infer", endpoint="infer")
    def infer(name: str, version: str | None = None) -> Response:
        """V2 inference: JSON tensors, or the binary tensor data extension."""
        return views.infer(request.environ, name, version).flask()

    @app.post("/v1/models/<name>:predict", endpoint="v1_predict")
    def v1_predict(name: str) -> Response:
        """KServe V1 prediction: {"instances": [...]} in, {"predictions": [...]} out."""
        return views.v1_predict(request.environ, name).flask()

    @app.get("/metrics", endpoint="metrics")
    def metrics() -> Response:
        """Prometheus metrics of all workers."""
        return Response(exposition(), content_type=CONTENT_TYPE)

    @app.get("/v2/openapi.json", endpoint="openapi")
    def openapi() -> Response:
        """This OpenAPI 3 document, generated from the routes above."""
        from services.serving.server.openapi import openapi_document

        return Reply(orjson.dumps(openapi_document(app))).flask()
