"""The one route table: every route the server answers, declared once, and the request id rule.

Each front end (the event-loop worker, the WSGI app, the ASGI app) turns a request into a ``Call``,
matches it with the server's ``Router`` and answers it with the route's handler, or, for the
inference routes (``handler`` is None), through ``inference`` (decode -> batch -> forward -> encode).
A route's ``name`` is the ``route`` label of the request metrics and the Flask endpoint; its
``summary`` is the OpenAPI summary. Paths use werkzeug's rule syntax (``<name>``).
"""

from __future__ import annotations

import os
import re
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import orjson
from werkzeug.exceptions import MethodNotAllowed as _WerkzeugMethodNotAllowed
from werkzeug.exceptions import NotFound as _WerkzeugNotFound
from werkzeug.routing import Map, RequestRedirect, Rule

from services.serving.errors import DlstackError, NotFound
from services.serving.server import lifecycle, logs
from services.serving.server.metrics import CONTENT_TYPE, exposition

if TYPE_CHECKING:
    from services.serving.server.app import ModelServer
    from services.serving.server.protocol import InferRequest, Signature, Tensors

JSON = "application/json"
STATUS: dict[int, str] = {int(code): f"{int(code)} {code.phrase}" for code in HTTPStatus}
# A client's id is echoed in a response header and written in log lines: visible ASCII only, bounded.
_SANE_REQUEST_ID = re.compile(r"[!-~]{1,200}")


def request_id(client: str | None) -> str:
    """The request id: the client's ``X-Request-ID`` when it is sane (1-200 visible ASCII chars), else a new one."""
    if client and _SANE_REQUEST_ID.fullmatch(client):
        return client
    return os.urandom(16).hex()  # a uuid4().hex without building a UUID


@dataclass(frozen=True, slots=True)
class Reply:
    """What a route answers; each front end writes it in its own protocol."""

    body: bytes
    status: int = 200
    content_type: str = JSON
    headers: tuple[tuple[str, str], ...] = ()


class RawHeaders(Mapping[str, str]):
    """Request headers kept as the parser gave them (lower-case ``bytes``), decoded only when read."""

    __slots__ = ("raw",)

    def __init__(self, raw: Mapping[bytes, bytes]) -> None:
        self.raw = raw

    def __getitem__(self, name: str) -> str:
        return self.raw[name.encode("latin-1")].decode("latin-1")

    def get(self, name: str, default: Any = None) -> Any:  # the hot path's lookup: no KeyError raised and caught
        value = self.raw.get(name.encode("latin-1"))
        return default if value is None else value.decode("latin-1")

    def __iter__(self) -> Iterator[str]:
        return (k.decode("latin-1") for k in self.raw)

    def __len__(self) -> int:
        return len(self.raw)


class Call:
    """One request on its way through the route table, whatever front end received it."""

    __slots__ = (
        "body",
        "decoded",
        "elapsed_ns",
        "error",
        "error_type",
        "headers",
        "inputs",
        "method",
        "outputs",
        "params",
        "path",
        "request_id",
        "route",
        "sig",
        "t0",
    )

    def __init__(self, method: str, path: str, headers: Mapping[str, str], body: bytes, rid: str, t0: int) -> None:
        self.method = method
        self.path = path  # percent-decoded, without the query
        self.headers = headers  # lower-case names
        self.body = body
        self.request_id = rid
        self.t0 = t0  # perf_counter_ns at the request's first byte
        self.route = "other"
        self.params: Mapping[str, str] = {}
        self.sig: Signature | None = None
        self.decoded: InferRequest | None = None  # V2 only: the request, for encoding its outputs
        self.inputs: Tensors | None = None
        self.outputs: Tensors | None = None
        self.error: str | None = None
        self.error_type: str | None = None
        self.elapsed_ns = 0


class RouteNotFound(NotFound):
    pass


class MethodNotAllowed(DlstackError):
    status = 405

    def __init__(self, message: str, allow: tuple[str, ...]) -> None:
        super().__init__(message)
        self.allow = allow


def error_reply(exc: BaseException, call: Call) -> Reply:
    """The one error mapping: DlstackError -> its status and message, anything else -> 500 with the request id."""
    rid = call.request_id
    headers: tuple[tuple[str, str], ...] = ()
    if isinstance(exc, DlstackError):
        status, msg = exc.status, exc.message
        if isinstance(exc, MethodNotAllowed):
            headers = (("Allow", ", ".join(exc.allow)),)
    else:
        status = 500
        msg = f"internal error (request id {rid}); the server log has the details"
        logs.server_log.error(
            "unhandled error (request id %s): %s",
            rid,
            "".join(traceback.format_exception(exc)),
            extra={"http.request.id": rid, "event.dataset": logs.SERVER_DATASET},
        )
    call.error, call.error_type = msg, type(exc).__name__
    body: dict[str, Any] = {"error": msg}
    if status >= 500:
        body["request_id"] = rid
    return Reply(orjson.dumps(body), status, JSON, headers)


Handler = Callable[["ModelServer", Call], Reply]


@dataclass(frozen=True, slots=True)
class Route:
    name: str  # the metric and log ``route`` label
    method: str
    paths: tuple[str, ...]
    summary: str
    handler: Handler | None = None  # None: an inference route, answered by ``inference``
    v1: bool = False  # KServe V1 body ({"instances"}) instead of V2 tensors
    # Cheap and non-blocking once the model is loaded: the event loop answers it itself.
    inline: bool = True


_LIVE = Reply(b'{"live":true}')
_READY = Reply(b'{"ready":true}')


def _live(s: ModelServer, call: Call) -> Reply:
    return _LIVE


def _ready(s: ModelServer, call: Call) -> Reply:
    if s.ready:
        return _READY
    reason = "the server is draining (SIGTERM received)" if lifecycle.draining() else s.reason
    return Reply(orjson.dumps({"ready": False, "error": f"not ready: {reason}"}), 503)


def _server_metadata(s: ModelServer, call: Call) -> Reply:
    return Reply(s.server_metadata)


def _model_metadata(s: ModelServer, call: Call) -> Reply:
    s.check(call.params["name"], call.params.get("version"))
    if s.spec is None:
        s.require_ready()
    return Reply(s.model_metadata)


def _model_ready(s: ModelServer, call: Call) -> Reply:
    name = call.params["name"]
    s.check(name, call.params.get("version"))
    if s.ready:
        return Reply(orjson.dumps({"name": name, "ready": True}))
    reason = s.reason or "the server is draining"
    return Reply(orjson.dumps({"name": name, "ready": False, "error": f"not ready: {reason}"}), 503)


def _metrics(s: ModelServer, call: Call) -> Reply:
    return Reply(exposition(), 200, CONTENT_TYPE)


def _openapi(s: ModelServer, call: Call) -> Reply:
    return Reply(s.openapi())


TABLE: tuple[Route, ...] = (
    Route(
        "infer",
        "POST",
        ("/v2/models/<name>/infer", "/v2/models/<name>/versions/<version>/infer"),
        "V2 inference: JSON tensors, or the binary tensor data extension.",
    ),
    Route(
        "v1_predict",
        "POST",
        ("/v1/models/<name>:predict",),
        'KServe V1 prediction: {"instances": [...]} in, {"predictions": [...]} out.',
        v1=True,
    ),
    Route("live", "GET", ("/v2/health/live",), "Liveness: the process answers; never depends on the model.", _live),
    Route(
        "ready",
        "GET",
        ("/v2/health/ready",),
        "Readiness: 200 once the model is loaded, 503 before that, on a load failure and while draining.",
        _ready,
    ),
    Route(
        "server_metadata",
        "GET",
        ("/v2",),
        "Server metadata: name, version and the protocol extensions supported.",
        _server_metadata,
    ),
    Route(
        "model_metadata",
        "GET",
        ("/v2/models/<name>", "/v2/models/<name>/versions/<version>"),
        "Model metadata: name, versions, platform, inputs and outputs.",
        _model_metadata,
    ),
    Route(
        "model_ready",
        "GET",
        ("/v2/models/<name>/ready", "/v2/models/<name>/versions/<version>/ready", "/v1/models/<name>"),
        "Model readiness: 200 when the model can serve, else 503 with the reason.",
        _model_ready,
    ),
    # Reads every worker's metric files: off the event loop.
    Route("metrics", "GET", ("/metrics",), "Prometheus metrics of all workers.", _metrics, inline=False),
    Route("openapi", "GET", ("/v2/openapi.json",), "This OpenAPI 3 document, generated from the routes.", _openapi),
)

_PARAM = re.compile(r"<([^<>]+)>")


class Router:
    """The table bound to one served model: exact paths of that model first, then werkzeug's matcher.

    Every served path of the model (``/v2/models/mlp/infer`` ...) is one dict lookup; anything else
    (another model's name, a percent-encoded path, a wrong method) goes through the werkzeug ``Map``
    built from the same table, so every front end gets the same route, 404 or 405 for a path.
    """

    def __init__(self, name: str, version: str, table: tuple[Route, ...] = TABLE) -> None:
        self.table = table
        self._by_name = {r.name: r for r in table}
        self.url_map = Map(
            [Rule(p, endpoint=r.name, methods=[r.method]) for r in table for p in r.paths], merge_slashes=False
        )
        self._adapter = self.url_map.bind("localhost")
        self.exact: dict[tuple[str, str], tuple[Route, Mapping[str, str]]] = {}
        values = {"name": name, "version": version}
        for r in table:
            for p in r.paths:
                args = _PARAM.findall(p)
                concrete = _PARAM.sub(lambda m: values[m.group(1)], p)
                try:  # only if the werkzeug rule matches it (a name with "/" in it does not)
                    if self._adapter.match(concrete, r.method) != (r.name, {a: values[a] for a in args}):
                        continue
                except Exception:
                    continue
                self.exact[(r.method, concrete)] = (r, {a: values[a] for a in args})
        # The event-loop worker looks up the raw request line bytes.
        self.exact_raw = {(m.encode(), p.encode("latin-1")): hit for (m, p), hit in self.exact.items() if p.isascii()}

    def match(self, method: str, path: str) -> tuple[Route, Mapping[str, str]]:
        hit = self.exact.get((method, path))
        if hit is not None:
            return hit
        try:
            endpoint, args = self._adapter.match(path, method)
        except _WerkzeugMethodNotAllowed as exc:
            allow = tuple(sorted(exc.valid_methods or ()))
            raise MethodNotAllowed(
                f"Method Not Allowed: {method} {_shown(path)}; this path answers {', '.join(allow)}", allow
            ) from None
        except (_WerkzeugNotFound, RequestRedirect):
            raise RouteNotFound(
                f"Not Found: no route for {method} {_shown(path)}; the routes are listed at /v2/openapi.json"
            ) from None
        return self._by_name[str(endpoint)], args


def _shown(path: str) -> str:
    return path if len(path) <= 200 else path[:200] + "..."
