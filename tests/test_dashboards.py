"""Grafana dashboards built with grafana-foundation-sdk: content, scoping, PromQL syntax (promtool), SLO lines.

Whether every query returns labelled series from real metrics is tests/test_prometheus_e2e.py.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from infra.alerts import ModelSLO, rule_file_yaml, rule_groups
from infra.dashboards import model_dashboard, overview_dashboard, promql_expressions, queries
from services.serving.errors import UserError

MODEL, NS = "mnist-mlp", "models"
SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^{}]*)\}")


@pytest.fixture(scope="module")
def dash() -> dict:
    return model_dashboard(MODEL, NS, error_ratio=0.01, p99_ms=250)


def _panel(d: dict, prefix: str) -> dict:
    (p,) = [p for p in d["panels"] if p.get("title", "").startswith(prefix)]
    return p


def test_model_dashboard_shows_what_operators_need(dash: dict) -> None:
    titles = [p["title"] for p in dash["panels"] if p["type"] == "timeseries"]
    for needed in ("Request rate", "Error ratio", "Latency p50 / p99", "Batch size", "CPU used vs requested"):
        assert any(t.startswith(needed) for t in titles), f"no {needed!r} panel in {titles}"
    assert any(t.startswith("Memory working set vs requested") for t in titles)
    assert "Replicas" in titles
    latency = [q for q in queries(dash) if q.panel.startswith("Latency")]
    assert {q.legend.split()[0] for q in latency} == {"p50", "p99"}
    cpu = [q.expr for q in queries(dash) if q.panel.startswith("CPU")]
    assert any("container_cpu_usage_seconds_total" in e for e in cpu)
    assert any('kube_pod_container_resource_requests{namespace="models", resource="cpu"}' in e for e in cpu)
    replicas = " ".join(q.expr for q in queries(dash) if q.panel == "Replicas")
    assert "kube_deployment_spec_replicas" in replicas and "kube_deployment_status_replicas_available" in replicas


def test_slo_is_drawn_as_a_threshold(dash: dict) -> None:
    def steps(p: dict) -> list:
        return [s["value"] for s in p["fieldConfig"]["defaults"]["thresholds"]["steps"]]

    assert steps(_panel(dash, "Error ratio")) == [None, 0.01]
    assert steps(_panel(dash, "Latency")) == [None, 0.25]  # seconds, the panel's unit
    assert _panel(dash, "Latency")["fieldConfig"]["defaults"]["unit"] == "s"
    no_slo = model_dashboard(MODEL, NS)
    assert "thresholds" not in _panel(no_slo, "Error ratio")["fieldConfig"]["defaults"]


def test_every_server_selector_is_scoped_to_the_model(dash: dict) -> None:
    for q in queries(dash):
        for metric, matchers in SELECTOR.findall(q.expr):
            if metric.startswith(("dlstack_", "model:")):
                assert f'namespace="{NS}"' in matchers and f'model="{MODEL}"' in matchers, q.expr
            else:  # cAdvisor / kube-state-metrics: at least the namespace
                assert f'namespace="{NS}"' in matchers, q.expr


def test_every_panel_uses_the_datasource_variable(dash: dict) -> None:
    (var,) = dash["templating"]["list"]
    assert var["name"] == "datasource" and var["query"] == "prometheus"
    for p in dash["panels"]:
        if p["type"] == "timeseries":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert p["targets"] and all(t["refId"] for t in p["targets"])


def test_recording_rules_used_by_dashboards_exist() -> None:
    recorded = {r["record"] for g in rule_groups([ModelSLO(MODEL, NS, 0.01, 250)]) for r in g["rules"] if "record" in r}
    used = set()
    for d in (model_dashboard(MODEL, NS), overview_dashboard([MODEL, "tiny-cnn"], NS)):
        used |= {m for q in queries(d) for m, _ in SELECTOR.findall(q.expr) if ":" in m}
    assert used and used <= recorded, used - recorded


@pytest.mark.tool("promtool")
def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each expression (as a recording rule); a typo in the PromQL fails here."""
    exprs = promql_expressions(model_dashboard(MODEL, NS)) + promql_expressions(overview_dashboard([MODEL, "b"], NS))
    assert not [e for e in exprs if "$" in e], "a Grafana variable was left unsubstituted"
    rules = {
        "groups": [{"name": "dashboards", "rules": [{"record": f"check:{i}", "expr": e} for i, e in enumerate(exprs)]}]
    }
    (tmp_path / "q.json").write_text(json.dumps(rules))
    res = subprocess.run(["promtool", "check", "rules", str(tmp_path / "q.json")], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    # ... and it would fail on a broken one, so the check above means something.
    rules["groups"][0]["rules"].append({"record": "check:broken", "expr": "sum by (model (rate(x[1m]))"})
    (tmp_path / "q.json").write_text(json.dumps(rules))
    res = subprocess.run(["promtool", "check", "rules", str(tmp_path / "q.json")], capture_output=True, text=True)
    assert res.returncode != 0


def test_dashboards_are_json_and_deterministic() -> None:
    a = json.dumps(model_dashboard(MODEL, NS, error_ratio=0.01, p99_ms=250), sort_keys=True)
    b = json.dumps(model_dashboard(MODEL, NS, error_ratio=0.01, p99_ms=250), sort_keys=True)
    assert a == b  # ConfigMap content must not churn between renders
    d = json.loads(a)
    assert d["title"] == f"dlstack / {NS} / {MODEL}" and "dlstack" in d["tags"]


def test_uids_are_unique_and_fit_grafana() -> None:
    long = "m" + "x" * 61
    uids = [
        model_dashboard(MODEL, NS)["uid"],
        model_dashboard(MODEL, "other")["uid"],
        model_dashboard(long, NS)["uid"],
        model_dashboard(long[:-1] + "y", NS)["uid"],
        overview_dashboard([MODEL], NS)["uid"],
    ]
    assert len(set(uids)) == len(uids)
    assert all(len(u) <= 40 for u in uids)


def test_overview_covers_every_model() -> None:
    d = overview_dashboard([MODEL, "tiny-cnn"], NS)
    exprs = [q.expr for q in queries(d)]
    assert all('model=~"mnist-mlp|tiny-cnn"' in e or 'deployment=~"(mnist-mlp|tiny-cnn)(-canary)?"' in e for e in exprs)
    assert {"Request rate by model", "Error ratio (5xx) by model", "p99 latency by model"} <= {
        q.panel for q in queries(d)
    }


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: model_dashboard("Bad_Model", NS), "'Bad_Model' must be a DNS-1123 label"),
        (lambda: model_dashboard(MODEL, "no spaces"), "namespace 'no spaces'"),
        (lambda: overview_dashboard([], NS), "no models given"),
    ],
)
def test_bad_input_is_a_user_error(call, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UserError, match=re.escape(message)):
        call()


def test_rule_file_yaml_round_trips() -> None:
    from ruamel.yaml import YAML

    text = rule_file_yaml([ModelSLO(MODEL, NS, 0.01, 250)])
    assert YAML(typ="safe").load(text) == {"groups": rule_groups([ModelSLO(MODEL, NS, 0.01, 250)])}


def test_drift_panel_shows_the_recorded_score_and_its_alert_line() -> None:
    assert not [p for p in model_dashboard(MODEL, NS)["panels"] if p.get("title", "").startswith("Drift")]
    d = model_dashboard(MODEL, NS, drift_window="1h", drift_psi=0.25)
    panel = _panel(d, "Drift score")
    assert [s["value"] for s in panel["fieldConfig"]["defaults"]["thresholds"]["steps"]] == [None, 0.25]
    exprs = [q.expr for q in queries(d) if q.panel.startswith("Drift")]
    assert exprs == [
        f'model:dlstack_drift_psi:1h{{namespace="{NS}", model="{MODEL}"}}',
        f'model_group:dlstack_drift_psi:1h{{namespace="{NS}", model="{MODEL}"}}',
    ]
    # the records it reads are the ones a drift-enabled model's rule group writes
    recorded = {
        r["record"]
        for g in rule_groups([ModelSLO(MODEL, NS, 0.01, 250, drift=True)])
        for r in g["rules"]
        if "record" in r
    }
    assert {m for e in exprs for m, _ in SELECTOR.findall(e)} <= recorded
