"""/metrics across gunicorn workers (prometheus_client multiprocess mode): counts equal what was sent."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families

from services.serving.artifact import load_spec
from tests.conftest import make_torch_mlp_artifact
from tests.serving import ServerHandle, start_server

GOOD = {"inputs": [{"name": "input", "shape": [2, 8], "datatype": "FP32", "data": [0.25] * 16}]}
BAD = {"inputs": [{"name": "input", "shape": [1, 7], "datatype": "FP32", "data": [0.25] * 7}]}


def scrape(srv: ServerHandle) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = requests.get(f"{srv.url}/metrics", timeout=10).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def fire(srv: ServerHandle) -> Counter[tuple[str, int]]:
    """A mixed load, one connection per request so both workers take part; returns (route, code) counts."""
    plan = (
        [("POST", "/v2/models/mlp/infer", GOOD, "infer")] * 60
        + [("POST", "/v2/models/mlp/infer", BAD, "infer")] * 20
        + [("POST", "/v2/models/ghost/infer", GOOD, "infer")] * 10
        + [("POST", "/v1/models/mlp:predict", {"instances": [[0.5] * 8]}, "v1_predict")] * 7
        + [("GET", "/v2/health/ready", None, "ready")] * 5
        + [("GET", "/v2/models/mlp", None, "model_metadata")] * 4
        + [("GET", "/v2/nope", None, "other")] * 3
    )

    def one(item: tuple[str, str, object, str]) -> tuple[str, int]:
        method, path, body, route = item
        r = requests.request(method, srv.url + path, json=body, headers={"Connection": "close"}, timeout=30)
        return route, r.status_code

    with ThreadPoolExecutor(8) as pool:
        return Counter(pool.map(one, plan))


def test_counts_equal_requests_sent_across_workers(tmp_path: Path) -> None:
    art = make_torch_mlp_artifact(tmp_path / "mlp", max_batch_size=1)  # one forward pass per request, counted below
    with start_server(art, workers=2) as srv:
        before = scrape(srv)  # start_server's own readiness probes are in here
        sent = fire(srv)
        assert sent[("infer", 200)] == 60 and sent[("infer", 400)] == 20 and sent[("infer", 404)] == 10
        served_by = Counter(a["process"]["pid"] for a in srv.access_lines(at_least=sum(sent.values())))
        assert len(served_by) == 2, f"one worker took all the load: {served_by}"

        m = scrape(srv)
        for (route, code), n in sent.items():
            labels = {"model": "mlp", "version": "1", "route": route, "code": str(code)}
            got = value(m, "dlstack_requests_total", **labels) - value(before, "dlstack_requests_total", **labels)
            assert got == n, f"{route} {code}: sent {n}, counted {got}"
            got = value(m, "dlstack_request_duration_seconds_count", route=route) - value(
                before, "dlstack_request_duration_seconds_count", route=route
            )
            assert got == sum(v for (r, _), v in sent.items() if r == route)
        assert value(m, "dlstack_requests_total", route="metrics") == 1  # the first scrape
        rows = 60 * 2 + 7
        assert value(m, "dlstack_inference_duration_seconds_count") == 67
        assert value(m, "dlstack_batch_size_sum") == rows
        assert value(m, "dlstack_inflight_requests") == 1  # the scrape itself
        spec = load_spec(art)
        assert value(m, "dlstack_model_info", framework="pytorch", sha256=spec.sha256) == 1
        assert 0 < value(m, "dlstack_model_load_seconds") < 60

        # A worker dies: its counts stay (files are kept), gunicorn replaces it, the new one adds up.
        victim = next(iter(served_by))
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while len(srv.load_events()) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(srv.load_events()) == 3 and victim not in srv.worker_pids()
        m2 = scrape(srv)
        assert value(m2, "dlstack_requests_total", route="infer", code="200") == 60
        assert value(m2, "dlstack_requests_total", route="metrics", code="200") == 2
        assert value(m2, "dlstack_inflight_requests") == 1
        assert value(m2, "dlstack_model_info", sha256=spec.sha256) == 1


def test_stale_metric_files_are_cleared_and_owned_dir_removed(tmp_path: Path) -> None:
    art = make_torch_mlp_artifact(tmp_path / "mlp")
    mdir = tmp_path / "prom"
    mdir.mkdir()
    (mdir / "counter_999999.db").write_bytes(b"stale from a previous run")
    with start_server(art, workers=1, env={"PROMETHEUS_MULTIPROC_DIR": str(mdir)}) as srv:
        assert not (mdir / "counter_999999.db").exists()
        assert requests.get(f"{srv.url}/metrics").status_code == 200
    assert mdir.is_dir()  # the user's dir is kept

    with start_server(art, workers=1) as srv:
        import psutil

        owned = Path(psutil.Process(srv.proc.pid).environ()["PROMETHEUS_MULTIPROC_DIR"])
        assert owned.is_dir() and any(owned.glob("*.db"))
    assert not owned.exists()  # created by dlstack serve, removed on exit


def test_every_flask_endpoint_is_a_contract_route_label(tmp_path: Path) -> None:
    from services.serving.server.app import create_app
    from services.serving.server.metrics import ROUTES
    from services.serving.server.settings import ServerSettings

    contract = {"infer", "v1_predict", "model_metadata", "model_ready", "server_metadata", "live", "ready",
                "metrics", "openapi", "other"}  # fmt: skip
    assert set(ROUTES) == contract
    app = create_app(ServerSettings(artifact_dir=make_torch_mlp_artifact(tmp_path / "mlp")), background_load=False)
    assert {r.endpoint for r in app.url_map.iter_rules()} == contract - {"other"}
