"""Monitoring under Pulumi mocks: kube-prometheus-stack values, the Grafana admin Secret, dashboards, SLO rules."""

from __future__ import annotations

import json
from typing import Any

import pulumi
import pytest

from infra.alerts import ALERTS, ModelSLO, rule_groups
from infra.helm import CHARTS
from infra.monitoring import Monitoring, MonitoringArgs
from services.serving.errors import UserError
from tests.k8s_checks import Recorded, crd_errors, find, kubernetes_errors, manifests, one, record

MODELS = (ModelSLO("mnist-mlp", "models", 0.01, 250), ModelSLO("tiny-cnn", "models", 0.02, 500))


def release(records: list[Recorded]) -> Recorded:
    (r,) = [r for r in records if r.type == "kubernetes:helm.sh/v3:Release"]
    return r


@pytest.fixture(scope="module")
def generated() -> list[Recorded]:
    return record(lambda: Monitoring("monitoring", MonitoringArgs(models=MODELS, retention="30d", storage="100Gi")))


@pytest.fixture(scope="module")
def from_config() -> list[Recorded]:
    password = pulumi.Output.secret("from-pulumi-config")
    return record(lambda: Monitoring("monitoring", MonitoringArgs(models=MODELS[:1], grafana_admin_password=password)))


def test_chart_pinned_and_values(generated: list[Recorded]) -> None:
    rel = release(generated).inputs
    pin = CHARTS["kube-prometheus-stack"]
    assert (rel["chart"], rel["version"], rel["namespace"]) == (pin.name, pin.version, "monitoring")
    spec = rel["values"]["prometheus"]["prometheusSpec"]
    assert spec["retention"] == "30d"
    assert spec["storageSpec"]["volumeClaimTemplate"]["spec"]["resources"]["requests"]["storage"] == "100Gi"
    for key in ("rule", "serviceMonitor", "podMonitor", "probe"):
        assert spec[f"{key}SelectorNilUsesHelmValues"] is False, key


def test_grafana_admin_comes_from_a_generated_secret(generated: list[Recorded]) -> None:
    admin = release(generated).inputs["values"]["grafana"]["admin"]
    (secret,) = [r for r in generated if r.kind == "Secret"]
    assert secret.obj_name == admin["existingSecret"]
    data = secret.inputs["stringData"]
    assert set(data) == {admin["userKey"], admin["passwordKey"]}
    # The password is the RandomPassword's result and travels as a secret, never as plain state.
    (generator,) = [r for r in generated if r.type == "random:index/randomPassword:RandomPassword"]
    assert len(data[admin["passwordKey"]]) == generator.inputs["length"] >= 24
    assert "stringData" in secret.secret_paths
    grafana_values = release(generated).inputs["values"]["grafana"]
    assert "adminPassword" not in grafana_values
    assert data[admin["passwordKey"]] not in json.dumps(grafana_values), "the password must not be inlined in values"


def test_grafana_admin_from_config_secret_skips_the_generator(from_config: list[Recorded]) -> None:
    assert not [r for r in from_config if r.type.startswith("random:")]
    (secret,) = [r for r in from_config if r.kind == "Secret"]
    assert secret.inputs["stringData"]["admin-password"] == "from-pulumi-config"
    assert "stringData" in secret.secret_paths


def test_dashboards_are_configmaps_for_the_sidecar(generated: list[Recorded]) -> None:
    sidecar = release(generated).inputs["values"]["grafana"]["sidecar"]["dashboards"]
    assert sidecar["enabled"] is True and sidecar["label"] == "grafana_dashboard"
    maps = find(manifests(generated), "ConfigMap")
    assert sorted(m["metadata"]["name"] for m in maps) == [
        "dlstack-model-mnist-mlp",
        "dlstack-model-tiny-cnn",
        "dlstack-overview",
    ]
    uids = set()
    for cm in maps:
        assert cm["metadata"]["labels"][sidecar["label"]] == sidecar["labelValue"]
        assert cm["metadata"]["namespace"] == sidecar["searchNamespace"]
        ((key, text),) = cm["data"].items()
        dashboard = json.loads(text)
        assert key.endswith(".json") and dashboard["panels"] and dashboard["title"]
        uids.add(dashboard["uid"])
        assert kubernetes_errors(cm, "1.31") == []
    assert len(uids) == 3, "dashboard uids must be unique or Grafana keeps only one"


def test_prometheus_rule_carries_every_model_slo(generated: list[Recorded]) -> None:
    rule = one(manifests(generated), "PrometheusRule")
    assert crd_errors(rule) == []
    assert rule["spec"]["groups"] == rule_groups(list(MODELS))
    alerts = {
        (r["alert"], r["labels"].get("model", "")) for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r
    }
    assert {a for a, _ in alerts} == set(ALERTS)
    (rule_record,) = [r for r in generated if r.kind == "PrometheusRule"]
    assert rule_record.inputs["metadata"]["namespace"] == "monitoring"


def test_no_models_no_rule() -> None:
    records = record(lambda: Monitoring("monitoring", MonitoringArgs()))
    assert not find(manifests(records), "PrometheusRule")
    assert not find(manifests(records), "ConfigMap")


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"retention": "7 days"}, 'retention "7 days" is not a duration'),
        ({"storage": "lots"}, 'storage "lots" is not a Kubernetes quantity'),
        ({"models": (MODELS[0], MODELS[0])}, "listed more than once"),
    ],
)
def test_bad_args_create_nothing(kw: dict[str, Any], message: str) -> None:
    created: list[Any] = []
    with pytest.raises(UserError, match=message):
        record(lambda: created.append(Monitoring("monitoring", MonitoringArgs(**kw))))
    assert not created
