"""The log contract, end to end: every stdout line of a REAL server (2 gunicorn workers, prediction log on
for every request) carries the ECS fields of infra.logstash.LOG_FIELDS (access lines ACCESS_FIELDS,
prediction events PREDICTION_FIELDS); the Logstash pipeline references exactly those fields; the
Kibana saved searches query only them, and find the right real lines.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from infra import kibana, logstash
from infra.logstash import (
    ACCESS_FIELDS,
    BASE_FIELDS,
    ERROR_FIELDS,
    LOG_FIELDS,
    PREDICTION_FIELDS,
    PREDICTION_TENSOR_FIELDS,
    PipelineArgs,
    pipeline,
    ref,
)
from services.serving.errors import UserError
from services.serving.server.observe import NO_LOG_HEADER
from services.serving.server.settings import ServerSettings
from tests.conftest import make_torch_mlp_artifact
from tests.serving import start_server

PREDICTION_SEARCH = kibana.PREDICTION_SEARCH_FIELDS
MODEL = "log-mlp"
# Exact in float32, so written as sent: it shows up in prediction events only, never in an access or server line.
MARKER = 123.4375
OPT_OUT_MARKER = 987.5625  # a value only sent with X-Dlstack-Log: off: it must show up nowhere

pytestmark = pytest.mark.xdist_group("logging_contract")


def flatten(doc: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """ECS nested objects -> dotted names, as Elasticsearch and Kibana see them."""
    out: dict[str, Any] = {}
    for k, v in doc.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


@pytest.fixture(scope="module")
def server_log(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[list[str], dict[str, int]]]:
    """All stdout lines of a server that saw good and bad requests, plus {request id: expected status}."""
    artifact = make_torch_mlp_artifact(tmp_path_factory.mktemp("log") / "artifact", name=MODEL)
    infer = f"/v2/models/{MODEL}/infer"
    good = {"inputs": [{"name": "input", "shape": [1, 8], "datatype": "FP32", "data": [MARKER] * 8}]}
    bad_shape = {"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32", "data": [MARKER] * 3}]}
    private = {"inputs": [{"name": "input", "shape": [1, 8], "datatype": "FP32", "data": [OPT_OUT_MARKER] * 8}]}
    calls: list[tuple[str, str, dict[str, Any], int]] = [
        ("POST", infer, {"json": good}, 200),
        ("POST", infer, {"json": good}, 200),
        ("POST", infer, {"json": bad_shape}, 400),
        ("POST", infer, {"json": private, "headers": {NO_LOG_HEADER: "off"}}, 200),
        ("POST", infer, {"data": b"{broken", "headers": {"Content-Type": "application/json"}}, 400),
        ("POST", "/v2/models/unknown/infer", {"json": good}, 404),
        ("POST", infer, {"data": b"[" + b"1," * 1024 + b"1]", "headers": {"Content-Type": "application/json"}}, 413),
        ("POST", f"/v1/models/{MODEL}:predict", {"json": {"instances": [[MARKER] * 8]}}, 200),
        ("GET", f"/v2/models/{MODEL}", {}, 200),
        ("GET", "/metrics", {}, 200),
    ]
    expected: dict[str, int] = {}
    env = {ServerSettings.env_name("prediction_log_sample"): "1"}
    with start_server(artifact, workers=2, extra_args=["--max-body-bytes", "1024"], env=env) as srv:
        for method, path, kw, status in calls:
            rid = f"test-{uuid.uuid4()}"
            headers = {**kw.pop("headers", {}), "X-Request-ID": rid}
            r = requests.request(method, srv.url + path, headers=headers, timeout=30, **kw)
            assert r.status_code == status, (path, r.status_code, r.text)
            assert r.headers["X-Request-ID"] == rid
            expected[rid] = status
        # The good inference requests that did not opt out: their events are written by a background thread.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(_predictions(srv.stdout_lines())) < 3:
            time.sleep(0.05)
        srv.stop()  # SIGTERM: shutdown lines are part of the contract too
        lines = srv.stdout_lines()
    yield lines, expected


def _predictions(lines: list[str]) -> list[dict[str, Any]]:
    docs = [flatten(json.loads(x)) for x in lines if x.startswith("{")]
    return [d for d in docs if d.get("event.dataset") == logstash.PREDICTIONS_DATASET]


def _every_line_is_ecs_json_with_the_base_fields(server_log: tuple[list[str], dict[str, int]]) -> None:
    lines, _ = server_log
    assert len(lines) >= 10  # worker boots + model loads + one access line per request
    for line in lines:
        doc = flatten(json.loads(line))
        missing = [f for f in BASE_FIELDS if f not in doc]
        assert not missing, f"{missing} missing in {line}"
        assert doc["service.name"] == logstash.SERVICE_NAME
        assert doc["log.level"] in {"debug", "info", "warning", "error", "critical"}


def _every_access_line_has_the_access_fields(server_log: tuple[list[str], dict[str, int]]) -> None:
    lines, expected = server_log
    access = [flatten(json.loads(x)) for x in lines]
    access = [d for d in access if d.get("event.dataset") == logstash.ACCESS_DATASET]
    by_id = {d["http.request.id"]: d for d in access}
    # Every request we sent is logged exactly once, with the status we got.
    assert {rid: by_id[rid]["http.response.status_code"] for rid in expected} == expected
    for d in access:
        missing = [f for f in ACCESS_FIELDS if f not in d]
        assert not missing, f"{missing} missing in {d}"
        assert isinstance(d["http.response.status_code"], int)
        assert isinstance(d["event.duration"], int) and d["event.duration"] > 0  # nanoseconds
        assert d["labels.model"] == MODEL and d["labels.model_version"] == "1"
        assert d["url.path"].startswith("/") and d["http.request.method"] in {"GET", "POST"}
        if d["http.response.status_code"] >= 400:
            assert all(d.get(f) for f in ERROR_FIELDS), f"error fields missing in {d}"
        else:
            assert not any(f in d for f in ERROR_FIELDS), d


def _payloads_are_logged_only_in_prediction_events(server_log: tuple[list[str], dict[str, int]]) -> None:
    lines, _ = server_log
    with_payload = [flatten(json.loads(x)) for x in lines if str(MARKER) in x]
    assert with_payload, "the prediction log is on: the sent values must appear in prediction events"
    assert {d["event.dataset"] for d in with_payload} == {logstash.PREDICTIONS_DATASET}
    assert not [x for x in lines if str(OPT_OUT_MARKER) in x], "X-Dlstack-Log: off must keep a request out"


def _every_prediction_event_has_the_prediction_fields(server_log: tuple[list[str], dict[str, int]]) -> None:
    lines, expected = server_log
    events = _predictions(lines)
    by_id = {d["http.request.id"]: d for d in events}
    assert len(by_id) == len(events), "one event per request"
    # Requests sent, answered 200 on an inference route and not opted out: each has its event.
    assert len([s for s in by_id.values() if s["http.response.status_code"] == 200]) == 3
    for d in events:
        missing = [f for f in BASE_FIELDS + PREDICTION_FIELDS + PREDICTION_TENSOR_FIELDS if f not in d]
        assert not missing, f"{missing} missing in {d}"
        assert d["http.response.status_code"] == expected[d["http.request.id"]]
        assert isinstance(d["http.response.status_code"], int) and isinstance(d["event.duration"], int)
        assert isinstance(d["dlstack.prediction.latency_ms"], float) and d["dlstack.prediction.latency_ms"] > 0
        assert d["labels.model"] == MODEL and d["labels.model_version"] == "1"
        assert d["dlstack.prediction.form"] in {"full", "summary"}
        if d["http.response.status_code"] != 200:
            assert d["dlstack.prediction.outputs"] is None


def _prediction_searches_match_the_prediction_lines(server_log: tuple[list[str], dict[str, int]]) -> None:
    """The failed-predictions query, applied to the real events, finds the non-200 ones; every column of both
    prediction searches (and the slowest search's sort field) has a value in every event."""
    lines, expected = server_log
    events = _predictions(lines)
    assert (
        f'event.dataset : "{logstash.PREDICTIONS_DATASET}" and not http.response.status_code : 200'
        == kibana.FAILED_PREDICTIONS_QUERY
    )
    failed = {d["http.request.id"] for d in events if d["http.response.status_code"] != 200}
    assert failed and failed <= {rid for rid, status in expected.items() if status != 200}
    for search in (kibana.failed_predictions_search(), kibana.slowest_predictions_search()):
        for d in events:
            assert all(c in d for c in search["attributes"]["columns"]), d
            assert all(f in d for f, _ in search["attributes"]["sort"]), d


def test_pipeline_references_exactly_the_contract_fields() -> None:
    config = pipeline()
    assert logstash.referenced_fields(config) == set(LOG_FIELDS)
    # The parser is not vacuous: a field typo in the pipeline shows up as an unknown field.
    broken = config.replace(ref("labels.model_version"), "[labels][version]")
    assert logstash.referenced_fields(broken) - set(LOG_FIELDS) == {"labels.version"}


def test_pipeline_structure() -> None:
    config = pipeline(PipelineArgs(es_cluster_name="my-es", index_prefix="ml-logs", beats_port=5045))
    # Braces balance outside strings, regex literals and comments (what Logstash's grammar nests on).
    code = re.sub(r'"(?:[^"\\]|\\.)*"', '""', config)
    code = re.sub(r"=~\s*/(?:[^/\\]|\\.)*/", "=~ //", code)
    code = re.sub(r"#.*", "", code)
    depth = 0
    for ch in code:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        assert depth >= 0
    assert depth == 0
    sections = re.findall(r"^(input|filter|output) \{", config, flags=re.M)
    assert sections == ["input", "filter", "output"]
    assert "port => 5045" in config
    # ECK's elasticsearchRefs env vars: <CLUSTERNAME>_ES_HOSTS etc., never a literal password.
    assert 'hosts => ["${MY_ES_ES_HOSTS}"]' in config and 'password => "${MY_ES_ES_PASSWORD}"' in config
    assert 'index => "ml-logs-%{+YYYY.MM.dd}"' in config
    for f in logstash.TOP_LEVEL_DOTTED:
        assert f'"{f}" => "{ref(f)}"' in config  # ecs-logging's dotted keys get nested


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"es_cluster_name": "My ES"}, "es_cluster_name 'My ES'"),
        ({"index_prefix": "Logs_"}, "index_prefix 'Logs_'"),
        ({"beats_port": 0}, "beats_port 0"),
        ({"predictions_index_prefix": "Pred"}, "predictions_index_prefix 'Pred'"),
        (
            {"predictions_index_prefix": "dlstack-logs-p"},
            "'dlstack-logs' (logs) and 'dlstack-logs-p' (predictions) overlap",
        ),
    ],
)
def test_bad_pipeline_args(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(UserError, match=re.escape(message)):
        PipelineArgs(**kw)


def test_kibana_objects_use_only_contract_fields(tmp_path: Path) -> None:
    objects = kibana.saved_objects()
    view, search, pred_view, failed, slowest = objects
    assert view["type"] == "index-pattern" and view["attributes"]["timeFieldName"] == "@timestamp"
    # The data view matches the indices the pipeline writes.
    assert view["attributes"]["title"] == f"{logstash.INDEX_PREFIX}-*"
    assert f'index => "{logstash.INDEX_PREFIX}-%{{+YYYY.MM.dd}}"' in pipeline()
    assert search["type"] == "search" and search["attributes"]["title"] == kibana.ERRORS_SEARCH_TITLE
    assert search["references"] == [
        {"name": "kibanaSavedObjectMeta.searchSourceJSON.index", "type": "index-pattern", "id": view["id"]}
    ]
    used = kibana.query_fields(search)
    assert {"event.dataset", "http.response.status_code", "error.message"} <= used
    assert kibana.unknown_fields(search) == set()
    broken = kibana.errors_search(query='labels.modle : "x" and http.response.status_code >= 500')
    assert kibana.unknown_fields(broken) == {"labels.modle"}
    ndjson = kibana.to_ndjson(objects)
    assert [json.loads(line)["id"] for line in ndjson.splitlines()] == [o["id"] for o in objects]
    # The prediction view covers the prediction indices only; its searches use only prediction-event fields.
    assert pred_view["attributes"]["title"] == f"{logstash.PREDICTIONS_INDEX_PREFIX}-*"
    assert f'index => "{logstash.PREDICTIONS_INDEX_PREFIX}-%{{+YYYY.MM.dd}}"' in pipeline()
    for s in (failed, slowest):
        assert s["references"][0]["id"] == pred_view["id"]
        assert kibana.unknown_fields(s, kibana.PREDICTION_SEARCH_FIELDS) == set()
    assert slowest["attributes"]["sort"][0] == ["dlstack.prediction.latency_ms", "desc"]
    assert kibana.unknown_fields(failed) == set()
    assert kibana.unknown_fields(kibana.failed_predictions_search("error.message : *"), PREDICTION_SEARCH) == {
        "error.message"
    }


def _errors_search_matches_the_error_lines(server_log: tuple[list[str], dict[str, int]]) -> None:
    """The saved search's query, applied to the real lines, finds exactly the failed requests."""
    lines, expected = server_log
    docs = [flatten(json.loads(x)) for x in lines]
    # kibana.ERRORS_QUERY is `event.dataset : "dlstack.access" and http.response.status_code >= 400`.
    assert f'event.dataset : "{logstash.ACCESS_DATASET}" and http.response.status_code >= 400' == kibana.ERRORS_QUERY
    hits = {
        d["http.request.id"]
        for d in docs
        if d.get("event.dataset") == logstash.ACCESS_DATASET and d["http.response.status_code"] >= 400
    }
    assert hits == {rid for rid, status in expected.items() if status >= 400}
    for d in docs:
        if d.get("event.dataset") == logstash.ACCESS_DATASET and d["http.request.id"] in hits:
            assert all(c in d for c in kibana.ERRORS_COLUMNS), d  # every column has a value


def test_real_server_logs_meet_the_contract(server_log: tuple[list[str], dict[str, int]], subtests: Any) -> None:
    """One test over one real server run (xdist could split separate tests across workers); each check
    is a subtest, reported on its own."""
    for check in (
        _every_line_is_ecs_json_with_the_base_fields,
        _every_access_line_has_the_access_fields,
        _payloads_are_logged_only_in_prediction_events,
        _errors_search_matches_the_error_lines,
        _every_prediction_event_has_the_prediction_fields,
        _prediction_searches_match_the_prediction_lines,
    ):
        with subtests.test(msg=check.__name__.strip("_")):
            check(server_log)
