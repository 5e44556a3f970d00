"""ECS JSON log lines on stdout: the shared log contract, request ids, and no payloads."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.conftest import make_torch_mlp_artifact
from tests.serving import ServerHandle, start_server

# Distinctive values: if any of them shows up in a log line, a payload leaked.
SECRET_IN = [0.7139182, -3.1415926, 2.7182818, 1.4142135, 0.5772156, -1.6180339, 9.8765432, 6.0221408]


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    art = make_torch_mlp_artifact(tmp_path_factory.mktemp("logs") / "mlp", name="logmodel", version="5")
    with start_server(art, workers=2) as s:
        yield s


def field(doc: dict[str, Any], dotted: str) -> Any:
    """ECS allows nested or dotted keys; accept both."""
    if dotted in doc:
        return doc[dotted]
    cur: Any = doc
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise KeyError(dotted)
        cur = cur[part]
    return cur


def access_for(srv: ServerHandle, rid: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10  # the line is written before the response, but our pipe reader may lag
    while time.monotonic() < deadline:
        for line in srv.stdout_lines():
            doc = json.loads(line)
            if doc.get("event", {}).get("dataset") == "dlstack.access" and field(doc, "http.request.id") == rid:
                return doc
        time.sleep(0.05)
    raise AssertionError(f"no access line for request id {rid}")


def test_access_lines_follow_the_contract(srv: ServerHandle) -> None:
    body = {"inputs": [{"name": "input", "shape": [1, 8], "datatype": "FP32", "data": SECRET_IN}]}
    r = requests.post(f"{srv.url}/v2/models/logmodel/infer", json=body, headers={"X-Request-ID": "trace-abc-1"})
    assert r.status_code == 200 and r.headers["X-Request-ID"] == "trace-abc-1"
    secret_out = r.json()["outputs"][0]["data"]
    bad = {"inputs": [{"name": "input", "shape": [1, 8], "datatype": "FP32", "data": ["x"] * 8}]}
    r = requests.post(f"{srv.url}/v2/models/logmodel/infer", json=bad, headers={"X-Request-ID": "trace-abc-2"})
    assert r.status_code == 400

    ok = access_for(srv, "trace-abc-1")
    expected = {
        "service.name": "dlstack-model-server",
        "labels.model": "logmodel",
        "labels.model_version": "5",
        "http.request.method": "POST",
        "url.path": "/v2/models/logmodel/infer",
        "http.response.status_code": 200,
        "event.dataset": "dlstack.access",
        "log.level": "info",
    }
    assert {k: field(ok, k) for k in expected} == expected
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", ok["@timestamp"])
    assert ok["ecs.version"] and ok["message"]
    assert type(field(ok, "event.duration")) is int and field(ok, "event.duration") > 0
    assert "error" not in ok

    err = access_for(srv, "trace-abc-2")
    assert field(err, "http.response.status_code") == 400 and field(err, "log.level") == "warning"
    assert "FP32 needs numbers" in field(err, "error.message") and field(err, "error.type") == "UserError"

    # payload values (in and out) never reach the logs, in any form
    text = "\n".join(srv.stdout_lines())
    for v in [*SECRET_IN, *secret_out]:
        assert f"{v}"[:7] not in text, f"payload value {v} leaked into the logs"


def test_generated_request_id_round_trip(srv: ServerHandle) -> None:
    r = requests.get(f"{srv.url}/v2/health/ready")
    rid = r.headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", rid)
    assert field(access_for(srv, rid), "url.path") == "/v2/health/ready"
    r = requests.get(f"{srv.url}/v2/health/ready")
    assert r.headers["X-Request-ID"] != rid  # a fresh one per request


def test_every_stdout_line_is_ecs_json(srv: ServerHandle) -> None:
    requests.get(f"{srv.url}/v2/models/logmodel")
    requests.get(f"{srv.url}/no/such/route")
    lines = srv.stdout_lines()
    assert len(lines) > 5
    for line in lines:
        doc = json.loads(line)  # raises on any non-JSON line (gunicorn's own lines included)
        for key in ("@timestamp", "log.level", "message", "ecs.version", "service.name"):
            field(doc, key)
    loggers = {field(json.loads(line), "log.logger") for line in lines}
    assert {"gunicorn.error", "dlstack.access", "dlstack.server"} <= loggers


def test_access_log_formatter_matches_the_generic_ecs_output() -> None:
    """The fast access-line path must produce what ecs-logging's own path produces for the same fields."""
    import logging

    import ecs_logging

    from services.serving.server import logs

    fast = logs.formatter()
    fields = {"labels": {"model": "m"}, "http": {"request": {"id": "r"}}, "event": {"dataset": "dlstack.access"}}
    rec = logging.LogRecord("dlstack.access", logging.INFO, __file__, 1, "GET %s %d", ("/x", 200), None)
    rec.ecs = fields
    generic = ecs_logging.StdlibFormatter(
        exclude_fields=["log.origin", "process.thread", "process.name", "log.original"]
    )
    rec2 = logging.LogRecord("dlstack.access", logging.INFO, __file__, 1, "GET %s %d", ("/x", 200), None)
    for k, v in {"labels.model": "m", "http.request.id": "r", "event.dataset": "dlstack.access",
                 "service.name": "dlstack-model-server"}.items():  # fmt: skip
        setattr(rec2, k, v)
    rec2.created, rec2.msecs = rec.created, rec.msecs
    assert json.loads(fast.format(rec)) == json.loads(generic.format(rec2))


@pytest.mark.parametrize("error", [None, ("bad input", "UserError")])
def test_direct_access_line_equals_the_formatter_line(error: tuple[str, str] | None) -> None:
    """The server writes access lines without a LogRecord; they must be the formatter's lines, byte for byte."""
    import logging

    from services.serving.server import logs

    fields: dict[str, Any] = {
        "labels": {"model": "m", "model_version": "3"},
        "http": {"request": {"id": "rid-1", "method": "POST"}, "response": {"status_code": 400 if error else 200}},
        "url": {"path": "/v2/models/m/infer"},
        "event": {"duration": 1234567, "dataset": logs.ACCESS_DATASET},
    }
    if error:
        fields["error"] = {"message": error[0], "type": error[1]}
    level = logging.WARNING if error else logging.INFO
    msg = f"POST /v2/models/m/infer {400 if error else 200}"
    rec = logging.LogRecord("dlstack.access", level, __file__, 1, "%s", (msg,), None)
    rec.ecs = fields
    expected = logs.formatter().format(rec) + "\n"
    got = logs.access_line(rec.created, rec.process or 0, level, msg, fields)
    assert got.decode() == expected
