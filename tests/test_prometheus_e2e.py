"""Dashboards and rules against a REAL Prometheus scraping a REAL model server (2 gunicorn workers).

Prometheus (/usr/bin/prometheus, loopback, tmp storage, 1 s scrape and evaluation) scrapes:

* job ``e2e-mlp`` (= the model's Service name, the ServiceMonitor's job label): the real server,
  with the target labels a ServiceMonitor adds (namespace, pod), plus a second target on a dead
  port standing for a crashed pod;
* jobs ``kubelet`` and ``kube-state-metrics``: two prometheus_client exporters in this process
  that stand in for cAdvisor and kube-state-metrics, which cannot exist without a cluster. They
  serve the real metric names and label sets; the cAdvisor CPU and memory values are the real
  usage of the server's processes (psutil) at scrape time. The Deployment wants 2 replicas and
  has 1 available (the dead pod).

The rules of infra.alerts are loaded as a rule file, so recording rules and alerts evaluate.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
import requests
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from infra.alerts import ModelSLO, rule_expressions, rule_file_yaml, rule_groups
from infra.dashboards import Query, model_dashboard, overview_dashboard, queries
from tests.conftest import free_port, make_torch_mlp_artifact
from tests.prometheus import running_prometheus, wait_for
from tests.serving import ServerHandle, start_server

MODEL = "e2e-mlp"
NS = "ml"
POD = f"{MODEL}-7d9f-abcde"
DEAD_POD = f"{MODEL}-7d9f-dead0"
OTHER_POD = "other-app-0"  # same namespace, not a model server: must never show up on the model's panels
# p99 objective of 1 microsecond: every real request breaks it, so the latency alert must go pending.
SLO = ModelSLO(name=MODEL, namespace=NS, error_ratio=0.01, p99_ms=0.001)
RATE_INTERVAL = "1m"

# The load: (route, code) -> count sent.
GOOD_V2, BAD_SHAPE, BAD_JSON, UNKNOWN_MODEL, GOOD_V1 = 24, 4, 3, 2, 3

pytestmark = [
    pytest.mark.tool("prometheus"),
    pytest.mark.xdist_group("prometheus_e2e"),
    pytest.mark.timeout(180),
]


# --- stand-ins for cAdvisor and kube-state-metrics ----------------------------------------------------


class KubeletCadvisor(Collector):
    """cAdvisor's container series for the model pod (real usage), a pause container and another pod."""

    def __init__(self, server: ServerHandle) -> None:
        self.server = server

    def _usage(self) -> tuple[float, float]:
        import psutil

        cpu, mem = 0.0, 0.0
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(self.server.proc.pid)
            for p in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    t = p.cpu_times()
                    cpu += t.user + t.system
                    mem += p.memory_info().rss
        return cpu, mem

    def collect(self) -> Iterator[Any]:
        cpu_s, mem = self._usage()
        labels = ["namespace", "pod", "container", "image"]
        cpu = CounterMetricFamily("container_cpu_usage_seconds_total", "Cumulative cpu time consumed", labels=labels)
        ws = GaugeMetricFamily("container_memory_working_set_bytes", "Current working set", labels=labels)
        # container="" is the pod cgroup total and "POD" the pause container, as cAdvisor reports them.
        for pod, container, c, m in (
            (POD, "model-server", cpu_s, mem),
            (POD, "POD", 0.01, 512 * 1024),
            (POD, "", cpu_s + 0.01, mem + 512 * 1024),
            (OTHER_POD, "app", 3.0, 64 * 2**20),
        ):
            cpu.add_metric([NS, pod, container, "img"], c)
            ws.add_metric([NS, pod, container, "img"], m)
        yield cpu
        yield ws


class KubeStateMetrics(Collector):
    def collect(self) -> Iterator[Any]:
        req = GaugeMetricFamily(
            "kube_pod_container_resource_requests",
            "The number of requested request resource by a container.",
            labels=["namespace", "pod", "uid", "container", "node", "resource", "unit"],
        )
        for pod, container in ((POD, "model-server"), (OTHER_POD, "app")):
            req.add_metric([NS, pod, "uid-" + pod, container, "kind-worker", "cpu", "core"], 1.0)
            req.add_metric([NS, pod, "uid-" + pod, container, "kind-worker", "memory", "byte"], 512 * 2**20)
        yield req
        spec = GaugeMetricFamily("kube_deployment_spec_replicas", "Desired pods", labels=["namespace", "deployment"])
        spec.add_metric([NS, MODEL], 2)
        yield spec
        avail = GaugeMetricFamily(
            "kube_deployment_status_replicas_available", "Available pods", labels=["namespace", "deployment"]
        )
        avail.add_metric([NS, MODEL], 1)
        yield avail


def _exporter(collector: Collector) -> tuple[int, Any]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    port = free_port()
    server, _thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    return port, server


# --- Prometheus ---------------------------------------------------------------------------------------


@dataclass
class Prom:
    url: str

    def query(self, expr: str) -> list[dict[str, Any]]:
        r = requests.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        if body.get("status") != "success":
            raise AssertionError(f"Prometheus rejected {expr!r}: {body.get('error')}")
        return list(body["data"]["result"])

    def problems(self, expr: str, expect_labels: frozenset[str] | set[str] = frozenset()) -> list[str]:
        """Why ``expr`` is broken against the data Prometheus has: [] when it is fine.

        Every selector's metric must exist and carry every label its matchers name (whatever the
        values: a 5xx selector may rightly match nothing yet); the whole expression must return
        series, each carrying ``expect_labels``.
        """
        out = []
        for metric, matchers in _selectors(expr):
            if not self.query(f"count({metric})"):
                out.append(f"{expr!r}: metric {metric} has no series")
                continue
            for label in matchers:
                if not self.query(f'count({metric}{{{label}!=""}})'):
                    out.append(f"{expr!r}: no {metric} series has a {label!r} label")
        try:
            result = self.query(expr)
        except AssertionError as exc:
            return [*out, str(exc)]
        if not result:
            out.append(f"{expr!r}: returned no series")
        for series in result:
            missing = expect_labels - set(series["metric"])
            if missing:
                out.append(f"{expr!r}: series {series['metric']} lacks labels {sorted(missing)}")
        return out


_SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^{}]*)\}")
_MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*"(?:[^"\\]|\\.)*"')


def _selectors(expr: str) -> list[tuple[str, list[str]]]:
    return [(m.group(1), _MATCHER.findall(m.group(2))) for m in _SELECTOR.finditer(expr)]


def _legend_labels(q: Query) -> set[str]:
    return set(re.findall(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}", q.legend))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Prom, ServerHandle, dict[tuple[str, str], int]]]:
    tmp = tmp_path_factory.mktemp("prom-e2e")
    artifact = make_torch_mlp_artifact(tmp / "artifact", name=MODEL)
    with start_server(artifact, workers=2) as server:
        cad_port, cad = _exporter(KubeletCadvisor(server))
        ksm_port, ksm = _exporter(KubeStateMetrics())
        (tmp / "rules.yaml").write_text(rule_file_yaml([SLO]))
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
            "rule_files": ["rules.yaml"],
            "scrape_configs": [
                {
                    "job_name": SLO.job_label,
                    "static_configs": [
                        {"targets": [f"127.0.0.1:{server.port}"], "labels": {"namespace": NS, "pod": POD}},
                        {"targets": [f"127.0.0.1:{free_port()}"], "labels": {"namespace": NS, "pod": DEAD_POD}},
                    ],
                },
                {
                    "job_name": "kubelet",
                    "honor_labels": True,
                    "static_configs": [{"targets": [f"127.0.0.1:{cad_port}"]}],
                },
                {
                    "job_name": "kube-state-metrics",
                    "honor_labels": True,
                    "static_configs": [{"targets": [f"127.0.0.1:{ksm_port}"]}],
                },
            ],
        }
        try:
            with running_prometheus(tmp, config) as url:
                prom = Prom(url)
                # Targets start being scraped a few seconds after /-/ready (discovery is batched): the load
                # must come after the first scrape, or every counter's first sample is its final value.
                wait_for(lambda: prom.query(f'up{{pod="{POD}"}} == 1'), 30, "first scrape of the server")
                sent = _load(server)
                wait_for(lambda: _counts(prom) == sent, 30, "the load's counters scraped")
                yield prom, server, sent
        finally:
            cad.shutdown()
            ksm.shutdown()


def _load(server: ServerHandle) -> dict[tuple[str, str], int]:
    """Good and deliberately bad requests from 4 threads (both workers answer); returns what was sent."""
    infer = f"{server.url}/v2/models/{MODEL}/infer"
    good = {"inputs": [{"name": "input", "shape": [2, 8], "datatype": "FP32", "data": [0.5] * 16}]}
    bad_shape = {"inputs": [{"name": "input", "shape": [1, 5], "datatype": "FP32", "data": [0.5] * 5}]}
    calls: list[tuple[str, dict[str, Any], int]] = (
        [(infer, {"json": good}, 200)] * GOOD_V2
        + [(infer, {"json": bad_shape}, 400)] * BAD_SHAPE
        + [(infer, {"data": b"{not json", "headers": {"Content-Type": "application/json"}}, 400)] * BAD_JSON
        + [(f"{server.url}/v2/models/nope/infer", {"json": good}, 404)] * UNKNOWN_MODEL
        + [(f"{server.url}/v1/models/{MODEL}:predict", {"json": {"instances": [[0.1] * 8]}}, 200)] * GOOD_V1
    )

    def call(c: tuple[str, dict[str, Any], int]) -> int:
        return requests.post(c[0], timeout=30, **c[1]).status_code

    # Two interleaved halves, scrapes apart, so every counter visibly increases and rates are > 0.
    codes = []
    with ThreadPoolExecutor(4) as pool:
        for half in (calls[::2], calls[1::2]):
            codes += list(pool.map(call, half))
            time.sleep(2.5)
    assert sorted(codes) == sorted(c[2] for c in calls), "the server answered differently than the load expects"
    return {
        ("infer", "200"): GOOD_V2,
        ("infer", "400"): BAD_SHAPE + BAD_JSON,
        ("infer", "404"): UNKNOWN_MODEL,
        ("v1_predict", "200"): GOOD_V1,
    }


def _counts(prom: Prom) -> dict[tuple[str, str], int]:
    res = prom.query(
        f'sum by (route, code) (dlstack_requests_total{{namespace="{NS}", model="{MODEL}", route=~"infer|v1_predict"}})'
    )
    return {(s["metric"]["route"], s["metric"]["code"]): round(float(s["value"][1])) for s in res}


def _all_queries() -> list[Query]:
    return queries(model_dashboard(MODEL, NS, error_ratio=SLO.error_ratio, p99_ms=SLO.p99_ms)) + queries(
        overview_dashboard([MODEL], NS)
    )


# --- tests --------------------------------------------------------------------------------------------


def _request_counters_match_the_load(stack: tuple[Prom, ServerHandle, dict[tuple[str, str], int]]) -> None:
    prom, _, sent = stack
    assert _counts(prom) == sent
    # Both gunicorn workers served: the multiprocess collector sums them into one series per label set.
    per_version = prom.query(f'sum by (version) (dlstack_requests_total{{model="{MODEL}", route="infer"}})')
    assert [s["metric"]["version"] for s in per_version] == ["1"]


def _every_dashboard_query_returns_labelled_series(stack: tuple[Prom, ServerHandle, Any]) -> None:
    prom, _, _ = stack
    qs = _all_queries()
    assert len(qs) >= 15

    def problems() -> list[str]:
        return [p for q in qs for p in prom.problems(q.promql(RATE_INTERVAL), _legend_labels(q))]

    # Rates need two scrapes after the load and recording rules one evaluation after that.
    with contextlib.suppress(TimeoutError):
        wait_for(lambda: not problems(), 30, "dashboard queries answer")
    assert problems() == []


def _resource_panels_count_only_the_model_container(stack: tuple[Prom, ServerHandle, Any]) -> None:
    prom, _, _ = stack
    (memory_used, memory_requested) = [q for q in _all_queries() if q.panel.startswith("Memory")]
    used = prom.query(memory_used.promql(RATE_INTERVAL))
    # One pod (the other app is filtered out by the dlstack_model_info join) ...
    assert [s["metric"]["pod"] for s in used] == [POD]
    assert used[0]["metric"]["model"] == MODEL
    # ... and its working set is the server container's alone: no pause container, no pod total.
    direct = prom.query(f'container_memory_working_set_bytes{{pod="{POD}", container="model-server"}}')
    assert float(used[0]["value"][1]) == float(direct[0]["value"][1])
    (requested,) = prom.query(memory_requested.promql(RATE_INTERVAL))
    assert float(requested["value"][1]) == 512 * 2**20


def _every_rule_evaluates_on_real_series(stack: tuple[Prom, ServerHandle, Any]) -> None:
    prom, _, _ = stack
    groups = rule_groups([SLO])
    records = [r for g in groups for r in g["rules"] if "record" in r]

    def problems() -> list[str]:
        out = []
        for r in records:
            expr = r["record"] + f'{{namespace="{NS}", model="{MODEL}"}}'
            out += prom.problems(expr, {"namespace", "model", "version"})
            # NaN would mean 0/0: no traffic in the window, so the rule never really computed.
            out += [f"{expr}: NaN" for s in prom.query(expr) if math.isnan(float(s["value"][1]))]
        # Alert expressions are only non-empty while they fire; check their selectors and syntax.
        for expr in rule_expressions(groups):
            out += [p for p in prom.problems(expr) if not p.endswith("returned no series")]
        return out

    with contextlib.suppress(TimeoutError):
        wait_for(lambda: not problems(), 30, "recording rules evaluated")
    assert problems() == []
    ratio = prom.query(f'model:dlstack_request_error_ratio:rate5m{{model="{MODEL}"}}')
    assert float(ratio[0]["value"][1]) == 0.0  # 4xx are not SLO errors and there was no 5xx


def _alerts_go_pending_on_real_series(stack: tuple[Prom, ServerHandle, Any]) -> None:
    prom, _, _ = stack

    def alerts() -> dict[str, dict[str, str]]:
        body = requests.get(f"{prom.url}/api/v1/alerts", timeout=5).json()
        return {a["labels"]["alertname"]: a["labels"] for a in body["data"]["alerts"]}

    expected = {"DlstackModelLatencyP99High", "DlstackModelTargetDown", "DlstackModelPodsNotReady"}
    with contextlib.suppress(TimeoutError):
        wait_for(lambda: expected <= set(alerts()), 30, "alerts pending")
    got = alerts()
    assert expected <= set(got), got
    assert "DlstackModelErrorRatioHigh" not in got  # no 5xx were sent
    assert got["DlstackModelLatencyP99High"]["version"] == "1"
    assert got["DlstackModelTargetDown"]["pod"] == DEAD_POD
    assert got["DlstackModelPodsNotReady"]["deployment"] == MODEL
    assert {a["model"] for a in got.values()} == {MODEL}


# Each must be rejected by Prom.problems, with the reason given.
BROKEN: list[tuple[str, str, str]] = [
    # misspelled metric
    (f'sum by (version) (rate(dlstack_request_total{{model="{MODEL}"}}[1m]))', "{{version}}", "has no series"),
    # a label the server does not export
    (f'sum by (version) (rate(dlstack_requests_total{{modle="{MODEL}"}}[1m]))', "{{version}}", "'modle' label"),
    # aggregated away a label the legend shows
    (f'sum by (model) (rate(dlstack_requests_total{{model="{MODEL}"}}[1m]))', "{{version}}", "lacks labels"),
    # a wrong label value
    ('sum by (version) (rate(dlstack_requests_total{model="e2e_mlp"}[1m]))', "{{version}}", "no series"),
    # a cAdvisor label cAdvisor does not have
    ('sum by (pod) (container_memory_working_set_bytes{container_name="x"})', "{{pod}}", "'container_name'"),
    # invalid PromQL
    (f'sum by (version) (rate(dlstack_requests_total{{model="{MODEL}"}}))', "{{version}}", "rejected"),
]


def _checker_rejects_broken_queries(stack: tuple[Prom, ServerHandle, Any], subtests: Any) -> None:
    prom, _, _ = stack
    for expr, legend, why in BROKEN:
        with subtests.test(msg="broken query is rejected", expr=expr):
            problems = prom.problems(expr, _legend_labels(Query(panel="broken", expr=expr, legend=legend)))
            assert any(why in p for p in problems), problems


def test_dashboards_and_rules_against_real_prometheus(
    stack: tuple[Prom, ServerHandle, dict[tuple[str, str], int]], subtests: Any
) -> None:
    """One test over one expensive stack (xdist could split separate tests across workers); each check
    is a subtest, reported on its own."""
    for check in (
        _request_counters_match_the_load,
        _every_dashboard_query_returns_labelled_series,
        _resource_panels_count_only_the_model_container,
        _every_rule_evaluates_on_real_series,
        _alerts_go_pending_on_real_series,
    ):
        with subtests.test(msg=check.__name__.strip("_")):
            check(stack)
    _checker_rejects_broken_queries(stack, subtests)
