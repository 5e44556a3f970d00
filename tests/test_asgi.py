"""The ASGI front end (services/serving/server/asgi.py) under a real gunicorn with uvicorn's worker."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from tests.conftest import make_torch_mlp_artifact
from tests.serving import ServerHandle, start_server

ASGI_APP = "services.serving.server.asgi:create_app()"
ROWS = np.linspace(-1, 1, 16, dtype=np.float32).reshape(2, 8)


def start_asgi_server(artifact_dir: Path, *, workers: int = 1, timeout: float = 60) -> Any:
    """``gunicorn -c <our conf> -k uvicorn_worker.UvicornWorker 'services.serving.server.asgi:create_app()'``."""
    worker = ["-k", "uvicorn_worker.UvicornWorker", ASGI_APP]
    return start_server(artifact_dir, workers=workers, timeout=timeout, direct=True, gunicorn_args=worker)


def wait_for_access(srv: ServerHandle, rid: str, timeout: float = 30) -> list[dict[str, Any]]:
    """The access lines of request ``rid``, once at least one came through the server's stdout pipe."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [d for d in srv.access_lines() if d["http"]["request"]["id"] == rid]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


@pytest.fixture(scope="module")
def asgi(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerHandle, np.ndarray]]:
    import torch

    art = make_torch_mlp_artifact(tmp_path_factory.mktemp("asgi") / "mlp")
    model = torch.jit.load(str(art / "model.pt"))
    expected = model(torch.from_numpy(ROWS)).detach().numpy()
    with start_asgi_server(art) as srv:
        yield srv, expected


def test_infer_json(asgi: tuple[ServerHandle, np.ndarray]) -> None:
    srv, expected = asgi
    body = {"id": "a-1", "inputs": [{"name": "input", "shape": [2, 8], "datatype": "FP32", "data": ROWS.tolist()}]}
    r = requests.post(f"{srv.url}/v2/models/mlp/infer", json=body, headers={"X-Request-ID": "asgi-json-1"})
    assert r.status_code == 200, r.text
    assert r.headers["X-Request-ID"] == "asgi-json-1" and r.headers["Content-Type"] == "application/json"
    out = r.json()
    assert out["id"] == "a-1" and out["model_name"] == "mlp" and out["outputs"][0]["shape"] == [2, 3]
    np.testing.assert_allclose(np.array(out["outputs"][0]["data"], np.float32).reshape(2, 3), expected, atol=1e-6)
    r = requests.post(f"{srv.url}/v1/models/mlp:predict", json={"instances": ROWS.tolist()})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(np.array(r.json()["predictions"], np.float32), expected, atol=1e-6)


def test_infer_binary(asgi: tuple[ServerHandle, np.ndarray]) -> None:
    srv, expected = asgi
    header = json.dumps(
        {
            "inputs": [{"name": "input", "shape": [2, 8], "datatype": "FP32", "parameters": {"binary_data_size": 64}}],
            "outputs": [{"name": "output", "parameters": {"binary_data": True}}],
        }
    ).encode()
    r = requests.post(
        f"{srv.url}/v2/models/mlp/versions/1/infer",
        data=header + ROWS.tobytes(),
        headers={"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))},
    )
    assert r.status_code == 200, r.text
    n = int(r.headers["Inference-Header-Content-Length"])
    meta = json.loads(r.content[:n])
    assert meta["outputs"][0]["parameters"]["binary_data_size"] == 24
    np.testing.assert_allclose(np.frombuffer(r.content[n:], np.float32).reshape(2, 3), expected, atol=1e-6)


def test_health_metadata_and_unknown_routes(asgi: tuple[ServerHandle, np.ndarray]) -> None:
    srv, _ = asgi
    assert requests.get(f"{srv.url}/v2/health/live").json() == {"live": True}
    assert requests.get(f"{srv.url}/v2/health/ready").json() == {"ready": True}
    assert requests.get(f"{srv.url}/v2").json()["extensions"] == ["binary_tensor_data"]
    meta = requests.get(f"{srv.url}/v2/models/mlp").json()
    assert meta["name"] == "mlp" and meta["inputs"][0] == {"name": "input", "datatype": "FP32", "shape": [-1, 8]}
    assert requests.get(f"{srv.url}/v2/models/mlp/ready").json() == {"name": "mlp", "ready": True}
    r = requests.get(f"{srv.url}/v3/nothing")
    assert r.status_code == 404 and r.json()["error"].startswith("Not Found: no route for GET /v3/nothing")
    r = requests.get(f"{srv.url}/v2/models/mlp/infer")
    assert r.status_code == 405 and r.headers["Allow"] == "POST"
    r = requests.post(f"{srv.url}/v2/models/other/infer", json={"inputs": []})
    assert r.status_code == 404 and "unknown model 'other'" in r.json()["error"]
    doc = requests.get(f"{srv.url}/v2/openapi.json").json()
    assert "/v2/models/{name}/infer" in doc["paths"]


def test_requests_are_counted_and_logged_once(asgi: tuple[ServerHandle, np.ndarray]) -> None:
    srv, _ = asgi
    body = {"inputs": [{"name": "input", "shape": [1, 8], "datatype": "FP32", "data": [0.5] * 8}]}
    r = requests.post(f"{srv.url}/v2/models/mlp/infer", json=body, headers={"X-Request-ID": "asgi-count-1"})
    assert r.status_code == 200
    lines = wait_for_access(srv, "asgi-count-1")
    assert len(lines) == 1 and lines[0]["url"]["path"] == "/v2/models/mlp/infer"
    assert lines[0]["http"]["response"]["status_code"] == 200
    text = requests.get(f"{srv.url}/metrics").text
    assert 'dlstack_requests_total{code="200",model="mlp",route="infer",version="1"}' in text


async def asgi_request(app: Any, method: str, path: str, body: bytes = b"") -> tuple[int, dict[bytes, bytes], bytes]:
    """One request through the ASGI 3 interface, as an ASGI server makes it."""
    sent: list[dict[str, Any]] = []
    incoming = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "headers": headers}
    await app(scope, receive, send)
    start, answer = sent
    return start["status"], dict(start["headers"]), answer["body"]


def test_ready_is_503_until_the_model_is_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The model loads in the background: live at once, ready (and inference) once it is loaded."""
    import asyncio
    import threading

    import services.serving.runtimes
    from services.serving.server.asgi import create_app
    from services.serving.server.settings import ServerSettings

    gate = threading.Event()
    real_create = services.serving.runtimes.create_runtime

    def gated_create(*args: Any, **kw: Any) -> Any:
        runtime = real_create(*args, **kw)
        real_load = runtime.load

        def slow_load() -> None:
            assert gate.wait(60)  # the "big model" finishes loading when the test says so
            real_load()

        runtime.load = slow_load  # type: ignore[method-assign]
        return runtime

    monkeypatch.setattr(services.serving.runtimes, "create_runtime", gated_create)
    app = create_app(ServerSettings(artifact_dir=make_torch_mlp_artifact(tmp_path / "mlp")))
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 8], "datatype": "FP32", "data": [1] * 8}]}).encode()

    async def scenario() -> None:
        status, headers, answer = await asgi_request(app, "GET", "/v2/health/live")
        assert (status, answer, headers[b"content-type"]) == (200, b'{"live":true}', b"application/json")
        assert len(headers[b"x-request-id"]) == 32  # made for it: the request had none
        status, _, answer = await asgi_request(app, "GET", "/v2/health/ready")
        assert status == 503 and json.loads(answer) == {"ready": False, "error": "not ready: model is loading"}
        infer = asyncio.ensure_future(asgi_request(app, "POST", "/v2/models/mlp/infer", body))
        await asyncio.sleep(0.2)
        assert not infer.done()  # it waits for the load, off the loop: the loop still answers
        assert (await asgi_request(app, "GET", "/v2/health/live"))[0] == 200
        gate.set()
        status, _, answer = await asyncio.wait_for(infer, 60)
        assert status == 200 and json.loads(answer)["outputs"][0]["shape"] == [1, 3]
        assert (await asgi_request(app, "GET", "/v2/health/ready"))[0] == 200
        status, _, answer = await asgi_request(app, "POST", "/v2/models/mlp/infer", body)  # now on the loop
        assert status == 200 and json.loads(answer)["outputs"][0]["shape"] == [1, 3]

    try:
        asyncio.run(scenario())
    finally:
        gate.set()
        app.infer_thread.shutdown()
