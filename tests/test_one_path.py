"""One route table, one inference path, one request-id function: every front end answers the same bytes.

The event-loop worker (real gunicorn), the ASGI app (real gunicorn + uvicorn's worker) and the WSGI
app (Flask's test client, in process) serve the same real model; each request must get the same
status, content type and body from all three, good requests and bad ones alike.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from services.serving.server.observe import Prediction
from tests.conftest import ROOT, make_torch_mlp_artifact
from tests.serving import ServerHandle, start_server
from tests.test_asgi import start_asgi_server

SERVING = ROOT / "services" / "serving"
ROWS = np.linspace(-1, 1, 24, dtype=np.float32).reshape(3, 8)


def string_constants(path: Path) -> Iterator[tuple[int, str]]:
    """(line, value) of every string literal of a module that is not a docstring."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value


def test_route_paths_appear_only_in_the_route_table() -> None:
    """A second route table (or a fast path that skips it) would have to spell a route path again."""
    needles = ("/infer", ":predict", "/v2/health", "/v2/models", "/v1/models", "/metrics", "openapi.json")
    found = {
        f"{path.relative_to(ROOT)}:{line}: {value!r}"
        for path in sorted(SERVING.rglob("*.py"))
        for line, value in string_constants(path)
        if " " not in value and any(n in value for n in needles)  # a path, or a piece of an f-string path
    }
    outside = {f for f in found if not f.startswith("services/serving/server/routes.py:")}
    assert not outside, "route paths outside services/serving/server/routes.py:\n" + "\n".join(sorted(outside))
    assert len(found) >= 8  # the table itself was read: the check looks at the right files


def test_request_ids_are_made_in_one_place() -> None:
    from services.serving.server.routes import request_id

    makers = {
        f"{path.relative_to(ROOT)}:{n}"
        for path in sorted(SERVING.rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if "urandom(" in line or "uuid4" in line
    }
    assert {m.split(":")[0] for m in makers} == {"services/serving/server/routes.py"}, makers
    for front_end in ("worker.py", "app.py", "asgi.py", "http1.py"):
        assert "request_id(" in (SERVING / "server" / front_end).read_text(), front_end
    assert request_id("trace-abc_1.2/3:4") == "trace-abc_1.2/3:4"
    for bad in (None, "", "has space", "x" * 201, "caf\u00e9", "tab\there"):
        made = request_id(bad)
        assert made != bad and len(made) == 32 and int(made, 16) >= 0
    assert request_id(None) != request_id(None)


def test_the_route_table_is_every_front_ends_routes(tmp_path: Path) -> None:
    from services.serving.server.app import create_app
    from services.serving.server.metrics import ROUTES
    from services.serving.server.routes import TABLE
    from services.serving.server.settings import ServerSettings

    app = create_app(ServerSettings(artifact_dir=make_torch_mlp_artifact(tmp_path / "mlp")), background_load=False)
    server = app.extensions["dlstack"]
    assert app.url_map is server.router.url_map  # Flask routes nothing of its own
    assert {r.endpoint for r in app.url_map.iter_rules()} == {r.name for r in TABLE} == set(ROUTES) - {"other"}
    assert {(r.method, p) for r in TABLE for p in r.paths} == {
        (m, r.rule) for r in app.url_map.iter_rules() for m in r.methods or () if m != "HEAD"
    }
    # the served model's own paths are exact lookups; the same answer as the general matcher
    assert len(server.router.exact) == sum(len(r.paths) for r in TABLE)
    for (method, path), (route, params) in list(server.router.exact.items()):
        server.router.exact.pop((method, path))
        try:
            assert server.router.match(method, path) == (route, params)
        finally:
            server.router.exact[(method, path)] = (route, params)


def binary_body(rows: np.ndarray, binary_out: bool = True) -> tuple[bytes, dict[str, str]]:
    header = json.dumps(
        {
            "id": "bin-1",
            "inputs": [
                {
                    "name": "input",
                    "shape": list(rows.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": rows.nbytes},
                }
            ],
            "outputs": [{"name": "output", "parameters": {"binary_data": binary_out}}],
        }
    ).encode()
    headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))}
    return header + rows.tobytes(), headers


def json_body(**changes: Any) -> bytes:
    tensor = {"name": "input", "shape": [3, 8], "datatype": "FP32", "data": ROWS.tolist(), **changes}
    return json.dumps({"id": "req-7", "inputs": [tensor]}).encode()


JSON_HEADERS = {"Content-Type": "application/json"}
BIN, BIN_HEADERS = binary_body(ROWS)
BIN_JSON_OUT, BIN_JSON_OUT_HEADERS = binary_body(ROWS, binary_out=False)
# (name, method, path, body, headers): the same bytes go to every front end
CASES: list[tuple[str, str, str, bytes, dict[str, str]]] = [
    ("infer json", "POST", "/v2/models/mlp/infer", json_body(), JSON_HEADERS),
    ("infer versioned", "POST", "/v2/models/mlp/versions/1/infer", json_body(), JSON_HEADERS),
    ("infer binary", "POST", "/v2/models/mlp/infer", BIN, BIN_HEADERS),
    ("infer binary in, json out", "POST", "/v2/models/mlp/infer", BIN_JSON_OUT, BIN_JSON_OUT_HEADERS),
    ("v1 predict", "POST", "/v1/models/mlp:predict", json.dumps({"instances": ROWS.tolist()}).encode(), JSON_HEADERS),
    ("server metadata", "GET", "/v2", b"", {}),
    ("model metadata", "GET", "/v2/models/mlp", b"", {}),
    ("model ready", "GET", "/v2/models/mlp/versions/1/ready", b"", {}),
    ("live", "GET", "/v2/health/live", b"", {}),
    ("ready", "GET", "/v2/health/ready", b"", {}),
    ("openapi", "GET", "/v2/openapi.json", b"", {}),
    # bad requests: same status, same error text
    ("bad json", "POST", "/v2/models/mlp/infer", b'{"inputs": [', JSON_HEADERS),
    ("wrong datatype", "POST", "/v2/models/mlp/infer", json_body(datatype="INT64"), JSON_HEADERS),
    ("wrong shape", "POST", "/v2/models/mlp/infer", json_body(shape=[3, 7]), JSON_HEADERS),
    ("unknown input", "POST", "/v2/models/mlp/infer", json_body(name="nope"), JSON_HEADERS),
    ("empty body", "POST", "/v2/models/mlp/infer", b"", JSON_HEADERS),
    ("media type", "POST", "/v2/models/mlp/infer", json_body(), {"Content-Type": "text/plain"}),
    ("v1 bad", "POST", "/v1/models/mlp:predict", b'{"inputs": [1]}', JSON_HEADERS),
    ("unknown model", "POST", "/v2/models/other/infer", json_body(), JSON_HEADERS),
    ("unknown version", "POST", "/v2/models/mlp/versions/9/infer", json_body(), JSON_HEADERS),
    ("unknown model metadata", "GET", "/v2/models/other", b"", {}),
    ("no such route", "GET", "/v3/nothing", b"", {}),
    ("wrong method", "GET", "/v2/models/mlp/infer", b"", {}),
    ("wrong method on a probe", "POST", "/v2/health/live", b"{}", JSON_HEADERS),
]
COMPARED_HEADERS = ("content-type", "inference-header-content-length", "allow", "x-request-id")


def normalized(status: int, headers: Any, body: bytes) -> tuple[int, dict[str, str | None], bytes]:
    return status, {h: headers.get(h) for h in COMPARED_HEADERS}, body


@pytest.fixture(scope="module")
def answers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, tuple[int, dict[str, Any], bytes]]]:
    """Every case, answered by each front end: {front end: {case: (status, headers, body)}}."""
    from services.serving.server.app import create_app
    from services.serving.server.settings import ServerSettings

    art = make_torch_mlp_artifact(tmp_path_factory.mktemp("onepath") / "mlp")
    out: dict[str, dict[str, tuple[int, dict[str, Any], bytes]]] = {}

    def over_http(srv: ServerHandle) -> dict[str, tuple[int, dict[str, Any], bytes]]:
        got = {}
        with requests.Session() as session:
            for i, (name, method, path, body, headers) in enumerate(CASES):
                r = session.request(
                    method, srv.url + path, data=body, headers={**headers, "X-Request-ID": f"case-{i}"}, timeout=60
                )
                got[name] = normalized(r.status_code, r.headers, r.content)
        return got

    with start_server(art, workers=1) as srv:
        out["worker"] = over_http(srv)
    with start_asgi_server(art) as srv:
        out["asgi"] = over_http(srv)
    # the settings gunicorn_conf gives the single worker of the servers above (its model metadata shows them)
    settings = ServerSettings(artifact_dir=art, intra_op_threads=1)
    client = create_app(settings, background_load=False).test_client()
    got = {}
    for i, (name, method, path, body, headers) in enumerate(CASES):
        r = client.open(path, method=method, data=body, headers={**headers, "X-Request-ID": f"case-{i}"})
        got[name] = normalized(r.status_code, r.headers, r.data)
    out["wsgi"] = got
    return out


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_every_front_end_gives_the_same_answer(answers: dict[str, dict[str, Any]], case: str) -> None:
    worker = answers["worker"][case]
    assert answers["asgi"][case] == worker
    assert answers["wsgi"][case] == worker


def test_the_answers_are_the_right_ones(answers: dict[str, dict[str, Any]]) -> None:
    """The same answer everywhere is only worth something if it is right."""
    got = answers["worker"]
    status, headers, body = got["infer json"]
    assert status == 200 and headers["x-request-id"] == "case-0"
    out = json.loads(body)
    assert out["id"] == "req-7" and out["outputs"][0]["shape"] == [3, 3]
    status, headers, body = got["infer binary"]
    n = int(headers["inference-header-content-length"])
    assert status == 200 and json.loads(body[:n])["outputs"][0]["parameters"] == {"binary_data_size": 36}
    binary = np.frombuffer(body[n:], np.float32).reshape(3, 3)
    np.testing.assert_allclose(np.array(out["outputs"][0]["data"], np.float32).reshape(3, 3), binary, atol=1e-6)
    expected_statuses = {
        "bad json": 400,
        "wrong datatype": 400,
        "wrong shape": 400,
        "unknown input": 400,
        "empty body": 400,
        "media type": 415,
        "v1 bad": 400,
        "unknown model": 404,
        "unknown version": 404,
        "unknown model metadata": 404,
        "no such route": 404,
        "wrong method": 405,
        "wrong method on a probe": 405,
    }
    for case, code in expected_statuses.items():
        status, headers, body = got[case]
        error = json.loads(body)["error"]
        assert status == code and headers["content-type"] == "application/json" and error, (case, status, body)
    assert got["wrong method"][1]["allow"] == "POST"
    assert json.loads(got["unknown model"][2])["error"] == "unknown model 'other'; this server serves 'mlp'"


class Recorder:
    def __init__(self, sample: float = 1.0) -> None:
        self.sample = sample
        self.seen: list[Prediction] = []

    def observe(self, p: Prediction) -> None:
        self.seen.append(p)


def test_observers_hear_each_inference_answer_once(tmp_path: Path) -> None:
    from services.serving.server.app import create_app
    from services.serving.server.settings import ServerSettings

    app = create_app(ServerSettings(artifact_dir=make_torch_mlp_artifact(tmp_path / "mlp")), background_load=False)
    recorder = Recorder()
    app.extensions["dlstack"].observers.append(recorder)
    client = app.test_client()
    ok = client.post("/v2/models/mlp/infer", data=json_body(), headers={**JSON_HEADERS, "X-Dlstack-Log": "off"})
    bad = client.post("/v2/models/mlp/infer", data=json_body(shape=[3, 7]), headers=JSON_HEADERS)
    assert client.get("/v2/health/live").status_code == 200  # not an inference: not observed
    assert client.post("/v2/models/other/infer", data=json_body(), headers=JSON_HEADERS).status_code == 404
    assert ok.status_code == 200 and bad.status_code == 400
    first, second, third = recorder.seen
    assert first.status == 200 and first.request_id == ok.headers["X-Request-ID"]
    assert first.model == "mlp" and first.version == "1" and first.headers["x-dlstack-log"] == "off"
    assert first.inputs is not None and first.outputs is not None
    np.testing.assert_array_equal(first.inputs["input"], ROWS)
    np.testing.assert_allclose(first.outputs["output"].ravel(), json.loads(ok.data)["outputs"][0]["data"], atol=1e-6)
    assert first.latency_s > 0
    assert second.status == 400 and second.inputs is None and second.outputs is None
    assert third.status == 404 and third.inputs is None


def test_one_draw_per_answer_is_shared_and_an_unsampled_answer_builds_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Observers at 1 % and 10 %: a draw below 0.01 reaches both, below 0.1 the 10 % one only, above
    neither; each answer draws once, and a Prediction is built only for an answer some observer takes."""
    from types import SimpleNamespace

    from services.serving.server import inference

    built: list[Any] = []
    monkeypatch.setattr(inference, "Prediction", lambda **kw: built.append(kw) or Prediction(**kw))
    log, bins = Recorder(0.01), Recorder(0.1)
    server = SimpleNamespace(name="m", version="1", observers=[log, bins])
    draws = [0.005, 0.05, 0.5, 0.0999, 0.01]
    calls = 0

    def draw() -> float:
        nonlocal calls
        calls += 1
        return draws[calls - 1]

    for i in range(len(draws)):
        call = SimpleNamespace(route="infer", request_id=f"r{i}", inputs={}, outputs={}, elapsed_ns=1, headers={})
        inference.notify(server, call, 200, draw)  # type: ignore[arg-type]
    assert calls == len(draws)
    assert [p.request_id for p in log.seen] == ["r0"]
    assert [p.request_id for p in bins.seen] == ["r0", "r1", "r3", "r4"]
    assert len(built) == 4 and bins.seen[0] is log.seen[0]  # one Prediction per answer, shared
    probe = SimpleNamespace(route="live", request_id="x", inputs=None, outputs=None, elapsed_ns=1, headers={})
    inference.notify(server, probe, 200, draw)  # not an inference route: no draw at all
    assert calls == len(draws)
