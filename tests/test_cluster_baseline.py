"""ClusterBaseline under Pulumi mocks: namespaces, quota, priorities, network flows, pinned add-ons."""

from __future__ import annotations

from typing import Any

import pytest

from infra.cluster_baseline import ClusterBaseline, ClusterBaselineArgs, ModelQuota, Namespaces
from infra.helm import CHARTS
from services.serving.errors import UserError
from stacks.mocks import HELM_RELEASE, RecordingMocks, run_program

pytestmark = pytest.mark.xdist_group("cluster-baseline")


def _render(args: ClusterBaselineArgs) -> RecordingMocks:
    mocks, _ = run_program(lambda: ClusterBaseline("baseline", args).models_namespace)
    return mocks


@pytest.fixture(scope="module")
def dev() -> RecordingMocks:
    quota = ModelQuota(
        requests_cpu="3000m",
        requests_memory="3072Mi",
        limits_cpu="6000m",
        limits_memory="3072Mi",
        pods=6,
        max_container_cpu="1000m",
        max_container_memory="512Mi",
    )
    return _render(ClusterBaselineArgs(quota=quota, kubernetes_version="1.31"))


@pytest.fixture(scope="module")
def prod_gpu() -> RecordingMocks:
    ns = Namespaces(models="serving", logging="logs", monitoring="mon", ingress="edge")
    return _render(ClusterBaselineArgs(namespaces=ns, ha=True, ingress_replicas=2, kind=False, gpu=True,
                                       quota=ModelQuota(gpus=4)))  # fmt: skip


def test_namespaces_carry_pod_security_levels(dev: RecordingMocks) -> None:
    levels = {
        o["metadata"]["name"]: o["metadata"]["labels"]["pod-security.kubernetes.io/enforce"]
        for o in dev.k8s_objects("Namespace")
    }
    # models run restricted; the platform's privileged needs are documented in _pod_security.
    assert levels == {
        "models": "restricted",
        "ingress": "baseline",
        "logging": "privileged",
        "monitoring": "privileged",
    }
    models = dev.k8s_object("Namespace", "models")["metadata"]["labels"]
    assert models["pod-security.kubernetes.io/enforce-version"] == "v1.31"
    assert models["pod-security.kubernetes.io/warn"] == "restricted"


def test_namespace_names_are_configurable(prod_gpu: RecordingMocks) -> None:
    assert sorted(o["metadata"]["name"] for o in prod_gpu.k8s_objects("Namespace")) == [
        "edge",
        "logs",
        "mon",
        "serving",
    ]
    assert prod_gpu.k8s_object("ResourceQuota", "models-quota")["metadata"]["namespace"] == "serving"


def test_quota_and_limit_range_follow_the_args(dev: RecordingMocks, prod_gpu: RecordingMocks) -> None:
    hard = dev.k8s_object("ResourceQuota", "models-quota", "models")["spec"]["hard"]
    assert hard == {
        "requests.cpu": "3000m",
        "requests.memory": "3072Mi",
        "limits.cpu": "6000m",
        "limits.memory": "3072Mi",
        "pods": "6",
        "services.loadbalancers": "0",
        "services.nodeports": "0",
    }
    assert prod_gpu.k8s_object("ResourceQuota", "models-quota")["spec"]["hard"]["requests.nvidia.com/gpu"] == "4"
    (limits,) = dev.k8s_object("LimitRange", "models-limits", "models")["spec"]["limits"]
    assert limits["max"] == {"cpu": "1000m", "memory": "512Mi"}
    assert limits["type"] == "Container"
    assert set(limits) == {"type", "default", "defaultRequest", "max"}


def test_priority_classes_rank_models_above_the_platform(dev: RecordingMocks) -> None:
    values = {o["metadata"]["name"]: o["value"] for o in dev.k8s_objects("PriorityClass")}
    assert values["dlstack-model-serving"] > values["dlstack-platform"]
    assert not any(o.get("globalDefault") for o in dev.k8s_objects("PriorityClass"))


# Every allowed connection of the stack, written out by hand: (source, destination, ports).
# A source/destination is "namespace/selector" for pods or a "cidr:" block for non-pod peers.
ING = "ingress/app.kubernetes.io/component=controller,app.kubernetes.io/name=ingress-nginx"
MODELS = "models/app.kubernetes.io/component=model-server"
PROM = "monitoring/app.kubernetes.io/name=prometheus"
AM = "monitoring/app.kubernetes.io/name=alertmanager"
GRAFANA = "monitoring/app.kubernetes.io/name=grafana"
KSM = "monitoring/app.kubernetes.io/name=kube-state-metrics"
PROM_OP = "monitoring/app=kube-prometheus-stack-operator"
ES = "logging/common.k8s.elastic.co/type=elasticsearch"
KB = "logging/common.k8s.elastic.co/type=kibana"
LS = "logging/common.k8s.elastic.co/type=logstash"
FB = "logging/common.k8s.elastic.co/type=beat"
ECK = "logging/control-plane=elastic-operator"
SETUP = "logging/app.kubernetes.io/component=logging-setup"
API = "cidr:0.0.0.0/0"
ANY = "cidr:0.0.0.0/0"
DNS = "kube-system/k8s-app=kube-dns"
HTTPS_API = "TCP/443,TCP/6443"
EXPECTED_FLOWS = {
    (ANY, ING, "TCP/443,TCP/80"),
    (API, ING, "TCP/8443"),
    (ING, MODELS, "TCP/8080"),
    (ING, KB, "TCP/5601"),
    (ING, GRAFANA, "TCP/3000"),
    (ING, API, HTTPS_API),
    (PROM, MODELS, "TCP/8080"),
    (PROM, ING, "TCP/10254"),
    (PROM, AM, "TCP/9093"),
    (PROM, KSM, "TCP/8080"),
    (PROM, ANY, "TCP/10250,TCP/9100"),
    (PROM, API, HTTPS_API),
    (GRAFANA, PROM, "TCP/9090"),
    (GRAFANA, API, HTTPS_API),
    (KSM, API, HTTPS_API),
    (AM, ANY, "TCP/443"),
    (PROM_OP, API, HTTPS_API),
    (API, PROM_OP, "TCP/10250"),
    (FB, LS, "TCP/5044"),
    (FB, API, HTTPS_API),
    (LS, ES, "TCP/9200"),
    (KB, ES, "TCP/9200"),
    (SETUP, ES, "TCP/9200"),
    (SETUP, KB, "TCP/5601"),
    (ECK, ES, "TCP/9200"),
    (ECK, API, HTTPS_API),
    (API, ECK, "TCP/9443"),
    (ES, ES, "TCP/9300"),
    ("ingress/", DNS, "TCP/53,UDP/53"),
    ("monitoring/", DNS, "TCP/53,UDP/53"),
    ("logging/", DNS, "TCP/53,UDP/53"),
}


def _sel(namespace: str, labels: dict[str, str]) -> str:
    return f"{namespace}/" + ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def _peer(rule: dict[str, Any]) -> str:
    if "ipBlock" in rule:
        return f"cidr:{rule['ipBlock']['cidr']}"
    ns = rule["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
    return _sel(ns, rule["podSelector"].get("matchLabels", {}))


def _ports(rule: dict[str, Any]) -> str:
    return ",".join(sorted(f"{p['protocol']}/{p['port']}" for p in rule["ports"]))


def _flows(mocks: RecordingMocks) -> tuple[set[tuple[str, str, str]], set[tuple[str, str, str]], set[str]]:
    """(egress flows, ingress flows, namespaces with a default deny) read back from the NetworkPolicies."""
    egress, ingress, deny = set(), set(), set()
    for pol in mocks.k8s_objects("NetworkPolicy"):
        ns, spec = pol["metadata"]["namespace"], pol["spec"]
        me = _sel(ns, spec["podSelector"].get("matchLabels", {}))
        if pol["metadata"]["name"] == "default-deny":
            assert spec == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
            deny.add(ns)
            continue
        for rule in spec.get("egress", []):
            for to in rule["to"]:
                egress.add((me, _peer(to), _ports(rule)))
        for rule in spec.get("ingress", []):
            for frm in rule["from"]:
                ingress.add((_peer(frm), me, _ports(rule)))
    return egress, ingress, deny


def test_network_policies_allow_exactly_the_stack_flows(dev: RecordingMocks) -> None:
    egress, ingress, deny = _flows(dev)
    assert deny == {"models", "logging", "monitoring", "ingress"}
    managed = ("models/", "logging/", "monitoring/", "ingress/")
    # Both ends of every flow are opened where they are managed, and nothing else is open.
    assert egress == {f for f in EXPECTED_FLOWS if f[0].startswith(managed)}
    assert ingress == {f for f in EXPECTED_FLOWS if f[1].startswith(managed)}
    # The models namespace makes no outbound connection at all (not even DNS).
    assert not any(src.startswith("models/") for src, _, _ in egress)


def test_ha_adds_only_the_replica_gossip_flow(prod_gpu: RecordingMocks) -> None:
    egress, _, _ = _flows(prod_gpu)
    assert ("mon/app.kubernetes.io/name=alertmanager", "mon/app.kubernetes.io/name=alertmanager",
            "TCP/9094,UDP/9094") in egress  # fmt: skip
    assert (
        len(egress) == len({f for f in EXPECTED_FLOWS if f[0].startswith(("logging/", "monitoring/", "ingress/"))}) + 1
    )


def test_addons_are_pinned_charts_and_the_gpu_plugin_only_with_gpus(
    dev: RecordingMocks, prod_gpu: RecordingMocks
) -> None:
    def releases(m: RecordingMocks) -> dict[str, dict[str, Any]]:
        return {r.inputs["name"]: r.inputs for r in m.of_type(HELM_RELEASE)}

    dev_rel, prod_rel = releases(dev), releases(prod_gpu)
    assert set(dev_rel) == {"ingress-nginx", "metrics-server"}
    assert set(prod_rel) == {"ingress-nginx", "metrics-server", "nvidia-device-plugin"}
    for name, rel in prod_rel.items():
        assert (rel["chart"], rel["version"], rel["repositoryOpts"]["repo"]) == (
            CHARTS[name].name,
            CHARTS[name].version,
            CHARTS[name].repo,
        )
    assert prod_rel["nvidia-device-plugin"]["namespace"] == "kube-system"
    # dev (kind): hostPorts on the ingress-ready node; prod: a LoadBalancer, 2 replicas, a PDB.
    dev_ctl = dev_rel["ingress-nginx"]["values"]["controller"]
    assert dev_ctl["hostPort"] == {"enabled": True}
    assert dev_ctl["nodeSelector"]["ingress-ready"] == "true"
    prod_ctl = prod_rel["ingress-nginx"]["values"]["controller"]
    assert (prod_ctl["service"]["type"], prod_ctl["replicaCount"], prod_ctl["minAvailable"]) == ("LoadBalancer", 2, 1)
    assert "--kubelet-insecure-tls" in dev_rel["metrics-server"]["values"]["args"]
    assert "--kubelet-insecure-tls" not in prod_rel["metrics-server"]["values"]["args"]


def test_invalid_args_fail_before_anything_is_created() -> None:
    mocks = RecordingMocks()
    bad = ClusterBaselineArgs(namespaces=Namespaces(models="x", logging="x"), ha=True, ingress_replicas=1)
    with pytest.raises(UserError) as err:
        run_program(lambda: ClusterBaseline("baseline", bad), mocks=mocks)
    assert err.value.message == (
        "ClusterBaseline: namespaces must be distinct, got ['x', 'x', 'monitoring', 'ingress']; "
        "ha needs ingress_replicas >= 2 (got 1)"
    )
    assert mocks.resources == []


# ---------------------------------------------------------------------------------------------
# KEDA: only when a model autoscales on load


@pytest.fixture(scope="module")
def with_keda() -> RecordingMocks:
    return _render(ClusterBaselineArgs(keda=True, ha=True, ingress_replicas=2, kind=False))


def test_keda_is_a_pinned_chart_in_its_own_restricted_namespace(with_keda: RecordingMocks, dev: RecordingMocks) -> None:
    assert "keda" not in {r.inputs["name"] for r in dev.of_type(HELM_RELEASE)}
    assert "keda" not in {o["metadata"]["name"] for o in dev.k8s_objects("Namespace")}
    (rel,) = [r.inputs for r in with_keda.of_type(HELM_RELEASE) if r.inputs["name"] == "keda"]
    assert (rel["chart"], rel["version"], rel["repositoryOpts"]["repo"]) == (
        "keda",
        CHARTS["keda"].version,
        "https://kedacore.github.io/charts",
    )
    assert rel["namespace"] == "keda"
    values = rel["values"]
    assert values["crds"] == {"install": True}  # the ScaledObjects need KEDA's CRDs
    assert values["operator"]["replicaCount"] == 2 and values["podDisruptionBudget"]["operator"] == {"minAvailable": 1}
    ns = with_keda.k8s_object("Namespace", "keda")["metadata"]["labels"]
    assert ns["pod-security.kubernetes.io/enforce"] == "restricted"


def test_keda_adds_exactly_its_prometheus_flow(with_keda: RecordingMocks) -> None:
    egress, ingress, deny = _flows(with_keda)
    keda = "keda/app.kubernetes.io/name=keda-operator"
    assert (keda, PROM, "TCP/9090") in ingress
    # keda is not a default-deny namespace (like kube-system): only Prometheus' side is opened.
    assert "keda" not in deny and not any(src.startswith("keda/") for src, _, _ in egress)
    without, ingress_without, _ = _flows(_render(ClusterBaselineArgs(ha=True, ingress_replicas=2, kind=False)))
    assert egress == without and ingress - ingress_without == {(keda, PROM, "TCP/9090")}


def test_keda_namespace_must_not_be_a_stack_namespace() -> None:
    mocks = RecordingMocks()
    bad = ClusterBaselineArgs(keda=True, keda_namespace="monitoring")
    with pytest.raises(UserError, match='keda_namespace "monitoring" must differ from'):
        run_program(lambda: ClusterBaseline("baseline", bad), mocks=mocks)
    assert mocks.resources == []
